//! The testbed's backends as their admins see them: raw Redis commands, IAM and S3 clients
//! with the SeaweedFS admin identity. Tests use them to tamper, seed tenant data, and look
//! for leftovers behind the operator's back.
#![allow(dead_code)]

use aws_sdk_iam::config::{BehaviorVersion, Credentials, Region};

use super::Testbed;

/// Runs one Redis command as the admin of `url`; panics on a connection or command error.
pub async fn redis_cmd(url: &str, args: &[&str]) -> redis::Value {
    try_redis_cmd(url, args)
        .await
        .unwrap_or_else(|e| panic!("redis {}: {e}", args[0]))
}

/// Runs one Redis command as the admin of `url`.
pub async fn try_redis_cmd(url: &str, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut c = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut c).await
}

/// An IAM client signed by the SeaweedFS admin identity.
pub fn iam_admin(tb: &Testbed) -> aws_sdk_iam::Client {
    let conf = aws_sdk_iam::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            tb.s3_access_key(),
            tb.s3_secret_key(),
            None,
            None,
            "testbed-admin",
        ))
        .endpoint_url(tb.s3_endpoint())
        .build();
    aws_sdk_iam::Client::from_conf(conf)
}

/// An S3 client (path style) signed by the SeaweedFS admin identity.
pub fn s3_admin(tb: &Testbed) -> aws_sdk_s3::Client {
    s3_client(
        tb,
        aws_sdk_s3::config::Credentials::new(
            tb.s3_access_key(),
            tb.s3_secret_key(),
            None,
            None,
            "testbed-admin",
        ),
    )
}

/// An S3 client (path style) acting with what an organization's credentials Secret holds: its
/// access key, and the session token too when it is a session.
pub fn s3_tenant(tb: &Testbed, creds: &bulkhead::layers::Credentials) -> aws_sdk_s3::Client {
    use bulkhead::layers::storage;
    s3_client(
        tb,
        aws_sdk_s3::config::Credentials::new(
            creds.get(storage::KEY_ACCESS_KEY_ID).expect("key id"),
            creds.get(storage::KEY_SECRET_ACCESS_KEY).expect("secret"),
            creds.get(storage::KEY_SESSION_TOKEN).map(str::to_owned),
            None,
            "test-tenant",
        ),
    )
}

fn s3_client(tb: &Testbed, credentials: aws_sdk_s3::config::Credentials) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(credentials)
        .endpoint_url(tb.s3_endpoint())
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}
