//! One small static binary with three roles, so that a node with no registry can run bulkhead's
//! dataplane checks from two locally built images:
//!
//! - `pause`: the pod sandbox process. Waits for SIGTERM or SIGINT and reaps orphans.
//! - `listen PORT...`: a canary. Accepts TCP on every port, answers one line and closes.
//! - `connect NAME=IP:PORT...`: a probe. Optionally waits first (`--delay-ms`: a policy
//!   enforcer learns a new Pod's address from the API server, a moment after the Pod starts),
//!   then tries every connection once, in parallel, with a timeout, and reports one line per target, `NAME VERDICT MILLIS`, on stdout and in the
//!   container's termination log, where the operator reads it from the Pod's status.
//!
//! No shell, no libc resolver: addresses are IPs, chosen by the operator.

use std::io::{ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// What the canary answers.
const GREETING: &[u8] = b"bulkhead-canary\n";
/// Where the kubelet takes the termination message from (the Pod's default path).
const TERMINATION_LOG: &str = "/dev/termination-log";
/// The kubelet keeps at most 4096 bytes of a termination message.
const TERMINATION_MAX: usize = 4096;
/// At most this many targets per run.
const MAX_TARGETS: usize = 32;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((role, rest)) = args.split_first() else {
        return usage("no role given");
    };
    match role.as_str() {
        "pause" => {
            if !rest.is_empty() {
                return usage("pause takes no arguments");
            }
            wait_for_stop()
        }
        "listen" => match listen(rest) {
            Ok(()) => wait_for_stop(),
            Err(e) => usage(&e),
        },
        "connect" => connect(rest),
        other => usage(&format!("unknown role {other:?}")),
    }
}

fn usage(err: &str) -> ExitCode {
    eprintln!(
        "bulkhead-netprobe: {err}\n\
         usage: bulkhead-netprobe pause\n\
         \x20      bulkhead-netprobe listen PORT...\n\
         \x20      bulkhead-netprobe connect [--timeout-ms N] [--delay-ms N] NAME=IP:PORT..."
    );
    ExitCode::from(2)
}

/// Blocks the stop and child signals in every thread (call before spawning any), then waits
/// for a stop signal, reaping children meanwhile: the duties of a container's PID 1.
fn wait_for_stop() -> ExitCode {
    let set = block_stop_signals();
    // SAFETY: plain libc calls on a signal set owned by this frame.
    unsafe {
        loop {
            let mut sig: libc::c_int = 0;
            if libc::sigwait(&set, &mut sig) != 0 {
                continue;
            }
            if sig == libc::SIGCHLD {
                while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
            } else {
                return ExitCode::SUCCESS;
            }
        }
    }
}

/// Blocks SIGTERM, SIGINT and SIGCHLD in this thread and every thread spawned afterwards, and
/// returns that set for `sigwait`.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a signal set owned by this frame.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{s:?} is not a TCP port (1-65535)")),
    }
}

fn listen(ports: &[String]) -> Result<(), String> {
    if ports.is_empty() || ports.len() > MAX_TARGETS {
        return Err(format!("listen takes 1 to {MAX_TARGETS} ports"));
    }
    let ports = ports
        .iter()
        .map(|p| parse_port(p))
        .collect::<Result<Vec<_>, _>>()?;
    block_stop_signals();
    for port in ports {
        let listener = TcpListener::bind(("0.0.0.0", port))
            .map_err(|e| format!("cannot listen on port {port}: {e}"))?;
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if let Ok(mut c) = conn {
                    let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = c.write_all(GREETING);
                }
            }
        });
    }
    println!("listening");
    Ok(())
}

/// One target of `connect`.
#[derive(Debug, PartialEq)]
struct Target {
    name: String,
    addr: SocketAddr,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn parse_target(s: &str) -> Result<Target, String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=IP:PORT"))?;
    if !valid_name(name) {
        return Err(format!(
            "target name {name:?} must be 1-63 of a-z, 0-9, '-' and '.'"
        ));
    }
    let (ip, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} is not IP:PORT"))?;
    let ip: IpAddr = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("{ip:?} is not an IP address"))?;
    Ok(Target {
        name: name.to_owned(),
        addr: SocketAddr::new(ip, parse_port(port)?),
    })
}

/// How one connection attempt ended.
fn verdict(r: std::io::Result<TcpStream>) -> &'static str {
    match r {
        Ok(_) => "open",
        Err(e) => match e.kind() {
            ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => "refused",
            ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => "unreachable",
            ErrorKind::PermissionDenied => "denied",
            _ => "error",
        },
    }
}

fn connect(args: &[String]) -> ExitCode {
    let mut timeout = DEFAULT_TIMEOUT;
    let mut delay = Duration::ZERO;
    let mut rest = args;
    while let [flag, value, tail @ ..] = rest
        && flag.starts_with("--")
    {
        let ms = match value.parse::<u64>() {
            Ok(ms) if ms <= 30_000 => Duration::from_millis(ms),
            _ => return usage(&format!("{flag} takes 0 to 30000")),
        };
        match flag.as_str() {
            "--timeout-ms" if !ms.is_zero() => timeout = ms,
            "--delay-ms" => delay = ms,
            _ => return usage(&format!("unknown option {flag} {value}")),
        }
        rest = tail;
    }
    std::thread::sleep(delay);
    if rest.is_empty() || rest.len() > MAX_TARGETS {
        return usage(&format!("connect takes 1 to {MAX_TARGETS} targets"));
    }
    let targets = match rest
        .iter()
        .map(|t| parse_target(t))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(t) => t,
        Err(e) => return usage(&e),
    };
    let handles: Vec<_> = targets
        .into_iter()
        .map(|t| {
            std::thread::spawn(move || {
                let start = Instant::now();
                let v = verdict(TcpStream::connect_timeout(&t.addr, timeout));
                format!("{} {} {}", t.name, v, start.elapsed().as_millis())
            })
        })
        .collect();
    let mut report = String::new();
    for h in handles {
        let line = h.join().unwrap_or_else(|_| "? error 0".to_owned());
        report.push_str(&line);
        report.push('\n');
    }
    print!("{report}");
    let mut bytes = report.into_bytes();
    bytes.truncate(TERMINATION_MAX);
    // The log exists only in a container; run by hand, stdout is the report.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .open(TERMINATION_LOG)
    {
        let _ = f.write_all(&bytes);
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = parse_target("peer-canary=10.88.0.7:8080").unwrap();
        assert_eq!(t.name, "peer-canary");
        assert_eq!(t.addr, "10.88.0.7:8080".parse().unwrap());
        assert!(parse_target("[fd00::1]:53").is_err());
        assert_eq!(
            parse_target("dns=[fd00::1]:53").unwrap().addr,
            "[fd00::1]:53".parse().unwrap()
        );
    }

    #[test]
    fn bad_targets_refused() {
        for bad in [
            "x",
            "=1.2.3.4:1",
            "A=1.2.3.4:1",
            "a b=1.2.3.4:1",
            "a=host:1",
            "a=1.2.3.4",
            "a=1.2.3.4:0",
            "a=1.2.3.4:70000",
            "a\n=1.2.3.4:1",
        ] {
            assert!(parse_target(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_target(&format!("{}=1.2.3.4:1", "a".repeat(64))).is_err());
    }

    #[test]
    fn open_and_refused_are_told_apart() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let open = l.local_addr().unwrap();
        assert_eq!(
            verdict(TcpStream::connect_timeout(&open, DEFAULT_TIMEOUT)),
            "open"
        );
        drop(l);
        assert_eq!(
            verdict(TcpStream::connect_timeout(&open, DEFAULT_TIMEOUT)),
            "refused"
        );
    }
}
