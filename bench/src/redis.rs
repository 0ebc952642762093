//! The Redis server of the `sluice-limits-redis` target: one `redis-server` per session,
//! started by `run` on a free loopback port without persistence (`--save ""`,
//! `--appendonly no`) and stopped by PID at the end. Its CPU is sampled beside the
//! proxy's but is not the proxy's: the report shows it apart (a fleet pays it once for
//! all its gateways). `INFO` tells how many script calls (round trips) and commands the
//! gateway made it run.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sys;

/// How long `redis-server` may take to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it may take to exit after `SIGTERM` before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Bound on one `INFO` or `PING` exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// A running `redis-server`, stopped when dropped.
#[derive(Debug)]
pub struct Server {
    /// Where it listens (loopback).
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl Server {
    /// Starts `redis-server` on a free loopback port with its log in `dir`, and waits
    /// until it answers `PING`.
    pub fn start(dir: &Path) -> Result<Server> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let addr = crate::targets::free_port()?;
        let log = dir.join("redis.log");
        let log_file = fs::File::create(&log)?;
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(addr.port().to_string())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--protected-mode", "no", "--dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        let mut server = Server {
            addr,
            child: Some(child),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = server.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                let tail = fs::read_to_string(&log).unwrap_or_default();
                bail!("redis-server exited with {status}:\n{tail}");
            }
            if command(addr, "PING").is_ok_and(|reply| reply.starts_with("+PONG")) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = sys::stop_child(&mut child, STOP_GRACE);
        }
    }
}

/// What a Redis server has processed since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Commands (`INFO stats` `total_commands_processed`): the commands a script runs
    /// count as well as the script's own call.
    pub commands: u64,
    /// Script calls (`INFO commandstats`: `EVALSHA`, `EVAL` and their `_RO` forms), each a
    /// round trip of the gateway's.
    pub scripts: u64,
}

impl Counts {
    /// What was processed between `earlier` and `self`, less the one `INFO` of the two
    /// samples that falls between them.
    pub fn since(self, earlier: Counts) -> Counts {
        Counts {
            commands: self.commands.saturating_sub(earlier.commands + 1),
            scripts: self.scripts.saturating_sub(earlier.scripts),
        }
    }
}

/// The [`Counts`] of the server at `addr` (`INFO stats commandstats`).
pub fn counts(addr: SocketAddr) -> Option<Counts> {
    parse_counts(&command(addr, "INFO stats commandstats").ok()?)
}

fn parse_counts(info: &str) -> Option<Counts> {
    let mut counts = Counts::default();
    let mut total = None;
    for line in info.lines() {
        if let Some(n) = line.strip_prefix("total_commands_processed:") {
            total = n.trim().parse().ok();
        }
        let Some((name, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        if matches!(name, "evalsha" | "eval" | "evalsha_ro" | "eval_ro") {
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|n| n.parse::<u64>().ok())?;
            counts.scripts += calls;
        }
    }
    counts.commands = total?;
    Some(counts)
}

/// Sends one inline command on a fresh connection and returns the reply: a simple
/// string (`+PONG`) whole, a bulk string's payload.
fn command(addr: SocketAddr, line: &str) -> Result<String> {
    let mut tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    tcp.write_all(format!("{line}\r\n").as_bytes())?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tcp.read(&mut buf)?;
        if n == 0 {
            bail!("redis closed the connection");
        }
        reply.extend_from_slice(&buf[..n]);
        if let Some(done) = complete(&reply) {
            return Ok(done);
        }
    }
}

/// The reply in `bytes` once it is complete: a `+`/`-` line, or a `$LEN` bulk string's
/// payload.
fn complete(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (first, rest) = text.split_once("\r\n")?;
    match first.strip_prefix('$') {
        None => Some(first.to_string()),
        Some(len) => {
            let len: usize = len.parse().ok()?;
            (rest.len() >= len).then(|| rest[..len].to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_commands_and_script_calls() {
        let info = "# Stats\r\ntotal_connections_received:9\r\ntotal_commands_processed:120\r\n\r\n\
                    # Commandstats\r\ncmdstat_evalsha:calls=30,usec=90,usec_per_call=3.00\r\n\
                    cmdstat_eval:calls=2,usec=9,usec_per_call=4.50\r\n\
                    cmdstat_hset:calls=32,usec=9,usec_per_call=0.28\r\n";
        let counts = parse_counts(info).unwrap();
        assert_eq!(
            counts,
            Counts {
                commands: 120,
                scripts: 32
            }
        );
        let later = Counts {
            commands: 200,
            scripts: 40,
        };
        assert_eq!(
            later.since(counts),
            Counts {
                commands: 79,
                scripts: 8
            }
        );
        assert_eq!(parse_counts("cmdstat_eval:calls=2"), None);
    }

    #[test]
    fn replies_are_complete_when_their_length_has_arrived() {
        assert_eq!(complete(b"+PONG\r\n").as_deref(), Some("+PONG"));
        assert_eq!(complete(b"+PON"), None);
        assert_eq!(complete(b"$10\r\nabc"), None);
        assert_eq!(
            complete(b"$12\r\n# Stats\r\na:1\r\n").as_deref(),
            Some("# Stats\r\na:1")
        );
    }

    /// A real `redis-server` (skipped where there is none): it starts, counts commands
    /// and script calls (a script's own commands among the commands), and is gone after
    /// the drop.
    #[test]
    fn starts_counts_and_stops() {
        if sys::version_of("redis-server", &["--version"]) == "unavailable" {
            eprintln!("redis-server not available: skipped");
            return;
        }
        let dir = crate::tls::tests::temp_dir("redis");
        let server = Server::start(&dir).unwrap();
        let pid = server.pid();
        let first = counts(server.addr).unwrap();
        command(server.addr, "PING").unwrap();
        command(
            server.addr,
            "EVAL \"redis.call('SET','k','1') return redis.call('GET','k')\" 0",
        )
        .unwrap();
        let second = counts(server.addr).unwrap();
        assert_eq!(
            second.since(first),
            Counts {
                commands: 4,
                scripts: 1
            }
        );
        drop(server);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
