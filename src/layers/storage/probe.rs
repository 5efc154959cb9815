//! Active probes with the organization's own credentials: its own prefix must work; every peer's
//! prefix, presigned URLs for peers' canaries, and bucket-level operations must be refused.

use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;

use super::{ApiError, StorageLayer, api_error};
use crate::layers::{Probe, Tenant};
use crate::tenant::OrgId;

/// Object the own-prefix probe writes and deletes again.
const OWN_PROBE_KEY: &str = "bulkhead-probe";
/// Bound on waiting for a freshly issued key to become valid on the server.
const KEY_PROPAGATION_ATTEMPTS: u32 = 20;
const KEY_PROPAGATION_STEP: Duration = Duration::from_millis(250);

/// Sends one probe request; its success is described by `what`.
async fn attempt<T, E>(
    op: &'static str,
    req: impl std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    what: impl FnOnce(T) -> String,
) -> Result<String, ApiError>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    req.await.map(what).map_err(|e| api_error(op, &e))
}

/// A listing's success, in words.
fn listed(out: aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output) -> String {
    format!("{} object(s) listed", out.contents().len())
}

/// A cross-tenant attempt's outcome: refused (as isolation requires) or not.
fn refused(name: String, result: Result<String, ApiError>) -> Probe {
    match result {
        Err(e) if e.is_access_denied() => Probe::new(name, true, e.describe()),
        Err(e) => Probe::new(
            name,
            false,
            format!("not refused with AccessDenied: {}", e.describe()),
        ),
        Ok(what) => Probe::new(name, false, format!("allowed: {what}")),
    }
}

/// An own-access check's outcome: must succeed.
fn allowed(name: String, result: Result<String, ApiError>) -> Probe {
    match result {
        Ok(what) => Probe::new(name, true, what),
        Err(e) => Probe::new(name, false, e.describe()),
    }
}

impl StorageLayer {
    /// Runs every probe. Never fails: what cannot be tried is a failed probe.
    pub(super) async fn probes(
        &self,
        tenant: &Tenant,
        client: &Result<aws_sdk_s3::Client, String>,
    ) -> Vec<Probe> {
        let org = &tenant.org_id;
        let c = match client {
            Ok(c) => c,
            Err(why) => {
                return vec![Probe::new(
                    format!("act as {org} in S3"),
                    false,
                    why.clone(),
                )];
            }
        };
        let bucket = &self.spec.bucket;
        let prefix = self.prefix(org);
        let mut probes = Vec::new();

        // Own prefix. The first request may meet a key the server has not loaded yet.
        let own_key = format!("{prefix}{OWN_PROBE_KEY}");
        let body = format!("probe by {org}");
        let mut put = Err(ApiError {
            op: "PutObject",
            code: None,
            status: None,
            message: String::new(),
            unreachable: false,
        });
        for round in 0..KEY_PROPAGATION_ATTEMPTS {
            put = attempt(
                "PutObject",
                c.put_object()
                    .bucket(bucket)
                    .key(&own_key)
                    .body(ByteStream::from(body.clone().into_bytes()))
                    .send(),
                |_| "stored".to_owned(),
            )
            .await;
            let propagating = matches!(&put, Err(e) if e.is("InvalidAccessKeyId") || e.is("InvalidClientTokenId"));
            if !propagating || round + 1 == KEY_PROPAGATION_ATTEMPTS {
                break;
            }
            tokio::time::sleep(KEY_PROPAGATION_STEP).await;
        }
        probes.push(allowed(format!("PUT {own_key} as {org}"), put));
        let get = match c.get_object().bucket(bucket).key(&own_key).send().await {
            Ok(out) => match out.body.collect().await.map(|b| b.into_bytes()) {
                Ok(b) if b.as_ref() == body.as_bytes() => {
                    Ok("read back what was written".to_owned())
                }
                Ok(_) => Err(ApiError {
                    op: "GetObject",
                    code: None,
                    status: None,
                    message: "read back different content".to_owned(),
                    unreachable: false,
                }),
                Err(e) => Err(ApiError {
                    op: "GetObject",
                    code: None,
                    status: None,
                    message: e.to_string(),
                    unreachable: true,
                }),
            },
            Err(e) => Err(api_error("GetObject", &e)),
        };
        probes.push(allowed(format!("GET {own_key} as {org}"), get));
        let list = c
            .list_objects_v2()
            .bucket(bucket)
            .prefix(&prefix)
            .send()
            .await
            .map_err(|e| api_error("ListObjectsV2", &e))
            .and_then(|out| {
                if out
                    .contents()
                    .iter()
                    .any(|o| o.key() == Some(own_key.as_str()))
                {
                    Ok(format!("{} object(s) listed", out.contents().len()))
                } else {
                    Err(ApiError {
                        op: "ListObjectsV2",
                        code: None,
                        status: None,
                        message: "own probe object not listed".to_owned(),
                        unreachable: false,
                    })
                }
            });
        probes.push(allowed(format!("LIST {prefix} as {org}"), list));
        let del = attempt(
            "DeleteObject",
            c.delete_object().bucket(bucket).key(&own_key).send(),
            |_| "deleted".to_owned(),
        )
        .await;
        probes.push(allowed(format!("DELETE {own_key} as {org}"), del));
        // The presigning machinery must work for the own canary, or a refused peer URL proves nothing.
        probes.push(allowed(
            format!("presigned GET {} as {org}", self.canary_key(org)),
            self.fetch_presigned(c, &self.canary_key(org)).await,
        ));

        for peer in &tenant.peers {
            probes.extend(self.peer_probes(c, org, peer).await);
        }

        // Bucket-level operations. Some servers (SeaweedFS) answer ListBuckets with the buckets the
        // caller may touch instead of a refusal: revealing the shared bucket, whose name the
        // organization holds anyway, is fine; any other bucket is not.
        let lb_name = format!("ListBuckets as {org}");
        probes.push(match c.list_buckets().send().await {
            Ok(out) => {
                let others: Vec<&str> = out
                    .buckets()
                    .iter()
                    .filter_map(|b| b.name())
                    .filter(|n| *n != bucket.as_str())
                    .collect();
                if others.is_empty() {
                    Probe::new(
                        lb_name,
                        true,
                        format!(
                            "answered with {} bucket(s), none but the shared one",
                            out.buckets().len()
                        ),
                    )
                } else {
                    refused(
                        lb_name,
                        Ok(format!("{} other bucket(s) listed", others.len())),
                    )
                }
            }
            Err(e) => refused(lb_name, Err(api_error("ListBuckets", &e))),
        });
        let whole = attempt(
            "ListObjectsV2",
            c.list_objects_v2().bucket(bucket).send(),
            |o| format!("{} object(s) listed", o.contents().len()),
        )
        .await;
        probes.push(refused(
            format!("LIST whole bucket {bucket} as {org}"),
            whole,
        ));
        let gbp = attempt(
            "GetBucketPolicy",
            c.get_bucket_policy().bucket(bucket).send(),
            |_| "policy read".to_owned(),
        )
        .await;
        probes.push(refused(format!("GetBucketPolicy {bucket} as {org}"), gbp));
        // Write back exactly the current policy, so that even a wrongful success changes nothing.
        match self.bucket_policy_text().await {
            Ok(Some(current)) => {
                let pbp = attempt(
                    "PutBucketPolicy",
                    c.put_bucket_policy().bucket(bucket).policy(current).send(),
                    |_| "policy written".to_owned(),
                )
                .await;
                probes.push(refused(format!("PutBucketPolicy {bucket} as {org}"), pbp));
            }
            Ok(None) => probes.push(Probe::new(
                format!("PutBucketPolicy {bucket} as {org}"),
                false,
                "the bucket has no policy to write back",
            )),
            Err(e) => probes.push(Probe::new(
                format!("PutBucketPolicy {bucket} as {org}"),
                false,
                format!("current policy unreadable: {e}"),
            )),
        }
        probes
    }

    async fn peer_probes(&self, c: &aws_sdk_s3::Client, org: &OrgId, peer: &OrgId) -> Vec<Probe> {
        let bucket = &self.spec.bucket;
        let canary = self.canary_key(peer);
        let peer_prefix = self.prefix(peer);
        // A key nobody owns, so a wrongful PUT or DELETE never touches the peer's data.
        let stray = format!("{peer_prefix}bulkhead-probe-from-{org}");
        let get = c.get_object().bucket(bucket).key(&canary).send();
        let get = attempt("GetObject", get, |_| "canary read".to_owned()).await;
        let put = c.put_object().bucket(bucket).key(&stray);
        let put = put
            .body(ByteStream::from_static(b"cross-tenant write"))
            .send();
        let put = attempt("PutObject", put, |_| "object written".to_owned()).await;
        if put.is_ok() {
            // Remove the wrongful write again; the failed probe already records it.
            let _ = self.delete_object("DeleteObject stray", &stray).await;
        }
        let del = c.delete_object().bucket(bucket).key(&stray).send();
        let del = attempt("DeleteObject", del, |_| "delete accepted".to_owned()).await;
        let list = c
            .list_objects_v2()
            .bucket(bucket)
            .prefix(&peer_prefix)
            .send();
        let list = attempt("ListObjectsV2", list, listed).await;
        let presigned = self.fetch_presigned(c, &canary).await;
        vec![
            refused(format!("GET {canary} as {org}"), get),
            refused(format!("PUT {stray} as {org}"), put),
            refused(format!("DELETE {stray} as {org}"), del),
            refused(format!("LIST {peer_prefix} as {org}"), list),
            refused(format!("presigned GET {canary} as {org}"), presigned),
        ]
    }

    /// Presigns a GET with the organization's credentials and fetches it over plain HTTP.
    async fn fetch_presigned(&self, c: &aws_sdk_s3::Client, key: &str) -> Result<String, ApiError> {
        let err = |code: Option<String>, status: Option<u16>, message: String| ApiError {
            op: "presigned GET",
            code,
            status,
            message,
            unreachable: false,
        };
        let config = PresigningConfig::expires_in(Duration::from_secs(300))
            .map_err(|e| err(None, None, e.to_string()))?;
        let req = c
            .get_object()
            .bucket(&self.spec.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| err(None, None, e.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| err(None, None, e.to_string()))?;
        let mut builder = http.get(req.uri());
        for (k, v) in req.headers() {
            builder = builder.header(k, v);
        }
        let resp = builder.send().await.map_err(|e| ApiError {
            unreachable: true,
            ..err(None, None, e.to_string())
        })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        if (200..300).contains(&status) {
            return Ok(format!("HTTP {status}, {} byte(s)", text.len()));
        }
        let code = text
            .split_once("<Code>")
            .and_then(|(_, rest)| rest.split_once("</Code>"))
            .map(|(c, _)| c.to_owned());
        Err(err(code, Some(status), String::new()))
    }
}
