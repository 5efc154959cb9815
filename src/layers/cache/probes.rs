//! Active probes: a fresh connection authenticated as the organization tries its own keys (must
//! work) and every peer's canary, channel and the keyspace-wide commands (must be refused).
//!
//! Commands that would change or flood shared state if isolation were broken (SET, DEL, PUBLISH
//! on a peer, FLUSHALL, KEYS, ACL LIST) are sent inside `MULTI` and then discarded: Redis runs
//! the same ACL check when queueing as when executing, and answers NOPERM at once, so a refusal
//! proves the same thing, and a broken ACL shows as `QUEUED` without ever running the command.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, Value};

use super::rules::{self, CacheRules, Refusal};
use crate::layers::Probe;
use crate::tenant::OrgId;

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long own probe keys live if a probe is interrupted before deleting them.
const PROBE_TTL_SECONDS: u64 = 60;

/// What to probe and where.
pub struct Target<'a> {
    pub rules: &'a CacheRules,
    pub org: &'a OrgId,
    /// Organizations whose canaries are attacked: the sentinel first, then real peers.
    pub peers: &'a [OrgId],
    /// `host:port` the probes run against.
    pub node: &'a str,
    /// Writes work only on the primary; replicas get the read-only subset.
    pub primary: bool,
}

/// What a command did.
#[derive(Debug)]
enum Outcome {
    Ok(Value),
    Refused(Refusal, String),
    Error(String),
}

fn outcome(r: redis::RedisResult<Value>) -> Outcome {
    match r {
        Ok(v) => Outcome::Ok(v),
        Err(e) => {
            let text = match (e.code(), e.detail()) {
                (Some(c), Some(d)) => format!("{c} {d}"),
                _ => e.to_string(),
            };
            match rules::refusal_kind(&text) {
                Some(kind) => Outcome::Refused(kind, text),
                None => Outcome::Error(text),
            }
        }
    }
}

fn shown(v: &Value) -> String {
    match v {
        Value::Nil => "nil".into(),
        Value::Okay => "OK".into(),
        Value::Int(n) => format!("integer {n}"),
        Value::SimpleString(s) => s.clone(),
        Value::BulkString(b) => format!("a value of {} bytes", b.len()),
        Value::Array(a) => format!("an array of {}", a.len()),
        _ => "a reply".into(),
    }
}

/// A cross-tenant attempt passes only when Redis refused it.
fn must_refuse(name: String, o: Outcome) -> Probe {
    match o {
        Outcome::Refused(Refusal::NoPerm, t) => Probe::new(name, true, format!("refused: {t}")),
        Outcome::Refused(Refusal::ScriptDenied, t) => {
            Probe::new(name, true, format!("refused inside the script: {t}"))
        }
        Outcome::Ok(Value::SimpleString(s)) if s == "QUEUED" => Probe::new(
            name,
            false,
            "allowed: the command was accepted (queued, then discarded unexecuted)",
        ),
        Outcome::Ok(v) => Probe::new(name, false, format!("allowed: {}", shown(&v))),
        Outcome::Error(t) => Probe::new(name, false, format!("not refused by ACL: {t}")),
    }
}

/// An own-data check passes when Redis did not refuse it and `check` accepts the reply.
fn must_work(name: String, o: Outcome, check: impl Fn(&Value) -> bool) -> Probe {
    match o {
        Outcome::Ok(v) if check(&v) => Probe::new(name, true, shown(&v)),
        Outcome::Ok(v) => Probe::new(name, false, format!("unexpected reply: {}", shown(&v))),
        Outcome::Refused(_, t) | Outcome::Error(t) => Probe::new(name, false, t),
    }
}

async fn run_cmd(conn: &mut MultiplexedConnection, cmd: &redis::Cmd) -> Outcome {
    outcome(cmd.query_async::<Value>(conn).await)
}

/// Sends `cmd` inside `MULTI`, then `DISCARD`: the ACL verdict without the effect.
async fn run_queued(conn: &mut MultiplexedConnection, cmd: &redis::Cmd) -> Outcome {
    if let Outcome::Error(t) | Outcome::Refused(_, t) = run_cmd(conn, &redis::cmd("MULTI")).await {
        return Outcome::Error(format!("MULTI failed: {t}"));
    }
    let result = run_cmd(conn, cmd).await;
    // Always discard: nothing queued may ever run.
    if let Outcome::Error(t) | Outcome::Refused(_, t) = run_cmd(conn, &redis::cmd("DISCARD")).await
    {
        return Outcome::Error(format!("DISCARD failed: {t}"));
    }
    result
}

/// `addr` moved to `host:port`, keeping its scheme and TLS settings.
fn moved_addr(addr: &ConnectionAddr, host: &str, port: u16) -> Option<ConnectionAddr> {
    match addr {
        ConnectionAddr::Tcp(..) => Some(ConnectionAddr::Tcp(host.to_owned(), port)),
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => Some(ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        }),
        _ => None,
    }
}

/// Runs `cmd` on `conn`; on a cluster's `MOVED` (the key's slot lives on another node) runs it
/// once more on that node, as the same user.
async fn run_routed(
    conn: &mut MultiplexedConnection,
    info: &ConnectionInfo,
    cmd: &redis::Cmd,
) -> Outcome {
    let first = cmd.query_async::<Value>(conn).await;
    let Err(e) = &first else {
        return outcome(first);
    };
    let Some((to, _slot)) = e.redirect_node() else {
        return outcome(first);
    };
    let Some((host, port)) = to
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
    else {
        return outcome(first);
    };
    let Some(addr) = moved_addr(info.addr(), &host, port) else {
        return outcome(first);
    };
    match connect(info.clone().set_addr(addr)).await {
        Ok(mut other) => outcome(cmd.query_async::<Value>(&mut other).await),
        Err(_) => outcome(first),
    }
}

async fn connect(info: ConnectionInfo) -> redis::RedisResult<MultiplexedConnection> {
    let client = redis::Client::open(info)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(PROBE_TIMEOUT))
        .set_response_timeout(Some(PROBE_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

fn cmd(parts: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd(parts[0]);
    for p in &parts[1..] {
        c.arg(*p);
    }
    c
}

/// Runs every probe for `target` with a fresh connection made from `info` (the organization's
/// own user and password).
pub async fn run(target: &Target<'_>, info: ConnectionInfo) -> Vec<Probe> {
    let mut out = Vec::new();
    let at = if target.primary {
        String::new()
    } else {
        format!(" on {}", target.node)
    };
    let me = target.org.as_str();
    let (own_prefix, own_canary) = match (
        target.rules.key_prefix(target.org),
        target.rules.canary_key(target.org),
    ) {
        (Ok(p), Ok(c)) => (p, c),
        (Err(e), _) | (_, Err(e)) => {
            return vec![Probe::new(
                format!("plan probes for {me}"),
                false,
                e.to_string(),
            )];
        }
    };
    let mut conn = match connect(info.clone()).await {
        Ok(c) => c,
        Err(e) => {
            let text = match (e.code(), e.detail()) {
                (Some(c), Some(d)) => format!("{c} {d}"),
                _ => format!("{:?}", e.kind()),
            };
            return vec![Probe::new(
                format!("AUTH as {me}{at}"),
                false,
                format!("cannot authenticate: {text}"),
            )];
        }
    };

    // Own keys: a session key and a rate-limit counter.
    let probe_key = format!("{own_prefix}bulkhead:probe");
    let counter = format!("{own_prefix}ratelimit:bulkhead-probe");
    let ttl = PROBE_TTL_SECONDS.to_string();
    let own_read = run_routed(&mut conn, &info, &cmd(&["GET", &own_canary])).await;
    out.push(must_work(
        format!("GET {own_canary} as {me}{at}"),
        own_read,
        // A replica may not have the canary yet; what matters there is that the read is allowed.
        |v| {
            matches!(v, Value::BulkString(b) if b == rules::CANARY_VALUE.as_bytes())
                || (!target.primary && *v == Value::Nil)
        },
    ));
    if target.primary {
        let set = run_routed(
            &mut conn,
            &info,
            &cmd(&["SET", &probe_key, "probe", "EX", &ttl]),
        )
        .await;
        out.push(must_work(format!("SET {probe_key} as {me}"), set, |v| {
            matches!(v, Value::Okay)
        }));
        let get = run_routed(&mut conn, &info, &cmd(&["GET", &probe_key])).await;
        out.push(must_work(
            format!("GET {probe_key} as {me}"),
            get,
            |v| matches!(v, Value::BulkString(b) if b == b"probe"),
        ));
        let incr = run_routed(&mut conn, &info, &cmd(&["INCR", &counter])).await;
        out.push(must_work(
            format!("INCR {counter} as {me}"),
            incr,
            |v| matches!(v, Value::Int(n) if *n >= 1),
        ));
        let exp = run_routed(&mut conn, &info, &cmd(&["EXPIRE", &counter, &ttl])).await;
        out.push(must_work(format!("EXPIRE {counter} as {me}"), exp, |v| {
            matches!(v, Value::Int(1))
        }));
        // One key per DEL: on a cluster the two keys live in different slots.
        for key in [&probe_key, &counter] {
            let del = run_routed(&mut conn, &info, &cmd(&["DEL", key])).await;
            out.push(must_work(format!("DEL {key} as {me}"), del, |v| {
                matches!(v, Value::Int(1))
            }));
        }
    }

    // Keyspace-wide and administrative commands.
    let keys = run_queued(&mut conn, &cmd(&["KEYS", "*"])).await;
    out.push(must_refuse(format!("KEYS * as {me}{at}"), keys));
    let scan = run_cmd(&mut conn, &cmd(&["SCAN", "0", "COUNT", "1"])).await;
    out.push(must_refuse(format!("SCAN 0 as {me}{at}"), scan));
    let randomkey = run_cmd(&mut conn, &cmd(&["RANDOMKEY"])).await;
    out.push(must_refuse(format!("RANDOMKEY as {me}{at}"), randomkey));
    let dbsize = run_cmd(&mut conn, &cmd(&["DBSIZE"])).await;
    out.push(must_refuse(format!("DBSIZE as {me}{at}"), dbsize));
    let flush = run_queued(&mut conn, &cmd(&["FLUSHALL"])).await;
    out.push(must_refuse(format!("FLUSHALL as {me}{at}"), flush));
    let config = run_cmd(&mut conn, &cmd(&["CONFIG", "GET", "maxmemory"])).await;
    out.push(must_refuse(
        format!("CONFIG GET maxmemory as {me}{at}"),
        config,
    ));
    let acl = run_queued(&mut conn, &cmd(&["ACL", "LIST"])).await;
    out.push(must_refuse(format!("ACL LIST as {me}{at}"), acl));
    let pubsub = run_cmd(&mut conn, &cmd(&["PUBSUB", "CHANNELS"])).await;
    out.push(must_refuse(format!("PUBSUB CHANNELS as {me}{at}"), pubsub));
    // On a cluster these list and count every organization's keys in a slot.
    let in_slot = run_cmd(&mut conn, &cmd(&["CLUSTER", "GETKEYSINSLOT", "0", "1"])).await;
    out.push(must_refuse(
        format!("CLUSTER GETKEYSINSLOT as {me}{at}"),
        in_slot,
    ));
    let count = run_cmd(&mut conn, &cmd(&["CLUSTER", "COUNTKEYSINSLOT", "0"])).await;
    out.push(must_refuse(
        format!("CLUSTER COUNTKEYSINSLOT as {me}{at}"),
        count,
    ));
    let clients = run_cmd(&mut conn, &cmd(&["CLIENT", "LIST"])).await;
    out.push(must_refuse(format!("CLIENT LIST as {me}{at}"), clients));
    // In no allowed category: refused only because the profile denies by default.
    let unlisted = run_cmd(&mut conn, &cmd(&["LOLWUT"])).await;
    out.push(must_refuse(
        format!("LOLWUT (outside the allowlist) as {me}{at}"),
        unlisted,
    ));
    if let Ok(record) = target.rules.owner_record_key(target.org) {
        let read = run_cmd(&mut conn, &cmd(&["GET", &record])).await;
        out.push(must_refuse(format!("GET {record} as {me}{at}"), read));
    }

    for peer in target.peers {
        let (peer_canary, peer_channel) = match (
            target.rules.canary_key(peer),
            target.rules.channel_prefix(peer),
        ) {
            (Ok(c), Ok(ch)) => (c, format!("{ch}events")),
            _ => {
                out.push(Probe::new(
                    format!("plan probes against {peer}"),
                    false,
                    "peer prefix refused",
                ));
                continue;
            }
        };
        let get = run_cmd(&mut conn, &cmd(&["GET", &peer_canary])).await;
        out.push(must_refuse(format!("GET {peer_canary} as {me}{at}"), get));
        let set = run_queued(&mut conn, &cmd(&["SET", &peer_canary, "overwritten"])).await;
        out.push(must_refuse(format!("SET {peer_canary} as {me}{at}"), set));
        let del = run_queued(&mut conn, &cmd(&["DEL", &peer_canary])).await;
        out.push(must_refuse(format!("DEL {peer_canary} as {me}{at}"), del));
        let mget = run_cmd(&mut conn, &cmd(&["MGET", &own_canary, &peer_canary])).await;
        out.push(must_refuse(
            format!("MGET {own_canary} {peer_canary} as {me}{at}"),
            mget,
        ));
        let publish = run_queued(&mut conn, &cmd(&["PUBLISH", &peer_channel, "probe"])).await;
        out.push(must_refuse(
            format!("PUBLISH {peer_channel} as {me}{at}"),
            publish,
        ));
        out.push(must_refuse(
            format!("SUBSCRIBE {peer_channel} as {me}{at}"),
            subscribe(info.clone(), &peer_channel).await,
        ));
        // Read-only scripts: run for real, the worst a broken ACL does is return the canary.
        let declared = run_cmd(
            &mut conn,
            &cmd(&[
                "EVAL",
                "return redis.call('GET', KEYS[1])",
                "1",
                &peer_canary,
            ]),
        )
        .await;
        out.push(must_refuse(
            format!("EVAL GET {peer_canary} (declared key) as {me}{at}"),
            declared,
        ));
        let hidden = run_cmd(
            &mut conn,
            &cmd(&[
                "EVAL",
                "return redis.call('GET', ARGV[1])",
                "0",
                &peer_canary,
            ]),
        )
        .await;
        out.push(must_refuse(
            format!("EVAL GET {peer_canary} (undeclared key) as {me}{at}"),
            hidden,
        ));
    }
    out
}

/// SUBSCRIBE on a connection of its own: a subscribed connection can do nothing else.
async fn subscribe(info: ConnectionInfo, channel: &str) -> Outcome {
    let mut conn = match connect(info).await {
        Ok(c) => c,
        Err(e) => return Outcome::Error(format!("connect for SUBSCRIBE: {:?}", e.kind())),
    };
    let r = tokio::time::timeout(
        PROBE_TIMEOUT,
        cmd(&["SUBSCRIBE", channel]).query_async::<Value>(&mut conn),
    )
    .await;
    match r {
        Ok(r) => outcome(r),
        Err(_) => Outcome::Error("no reply to SUBSCRIBE".into()),
    }
}
