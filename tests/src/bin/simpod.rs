//! simpod: the traffic tool run inside simulated pods. `serve` accepts
//! connections, reads each to EOF and answers with a fixed number of bytes;
//! `connect` opens N connections (C at a time), sends S bytes, half-closes,
//! reads the reply to EOF and closes, printing one JSON line per connection
//! and a summary (types in `flowaudit_tests::simpod`). Every connection ends
//! with an orderly FIN exchange, never a reset, so what the agent reports as
//! bytes and close reason is predictable.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use flowaudit_tests::simpod::{ConnRecord, ConnResult, Ready, Served, Summary};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Parser)]
#[command(name = "simpod", about = "Traffic tool for flowaudit's simulated pods")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Listen, read each connection to EOF, reply with N bytes, close.
    Serve {
        /// Address to listen on, e.g. 10.213.0.2:8080 or [fdfa:ca11:0:0::2]:8080 (repeatable).
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// Bytes written back on each connection after the client's EOF.
        #[arg(long, default_value_t = 0)]
        reply_bytes: u64,
        /// Print one JSON line per served connection (the caller must read stdout).
        #[arg(long)]
        log_connections: bool,
    },
    /// Open connections and report each as a JSON line, then a summary line.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value_t = 0)]
        send_bytes: u64,
        #[arg(long, default_value_t = 1)]
        concurrency: u32,
        /// Limit for the connect and for each later read/write.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Keep each established connection open this long before sending.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve {
            listen,
            reply_bytes,
            log_connections,
        } => serve(&listen, reply_bytes, log_connections),
        Cmd::Connect {
            to,
            count,
            send_bytes,
            concurrency,
            timeout_ms,
            hold_ms,
        } => {
            if concurrency == 0 {
                bail!("--concurrency must be at least 1");
            }
            connect(
                to,
                count,
                send_bytes,
                concurrency,
                Duration::from_millis(timeout_ms),
                Duration::from_millis(hold_ms),
            )
        }
    }
}

fn listener(addr: SocketAddr) -> Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .with_context(|| format!("create socket for {addr}"))?;
    s.set_reuse_address(true)
        .with_context(|| format!("SO_REUSEADDR on {addr}"))?;
    if addr.is_ipv6() {
        // Lets [::]:P and 0.0.0.0:P be served side by side.
        s.set_only_v6(true)
            .with_context(|| format!("IPV6_V6ONLY on {addr}"))?;
    }
    s.bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    // A deep backlog so a burst of concurrent clients is never dropped at SYN.
    s.listen(4096)
        .with_context(|| format!("listen on {addr}"))?;
    Ok(s.into())
}

fn serve(addrs: &[SocketAddr], reply_bytes: u64, log: bool) -> Result<()> {
    let listeners = addrs
        .iter()
        .map(|a| listener(*a))
        .collect::<Result<Vec<_>>>()?;
    let bound = listeners
        .iter()
        .map(|l| l.local_addr().context("local address of a listener"))
        .collect::<Result<Vec<_>>>()?;
    let out = Arc::new(Mutex::new(std::io::stdout()));
    {
        let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
        let ready = Ready {
            ready: true,
            listen: bound,
            pid: std::process::id(),
        };
        writeln!(o, "{}", serde_json::to_string(&ready)?).context("write ready line")?;
        o.flush().context("flush ready line")?;
    }
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let out = out.clone();
            std::thread::spawn(move || accept_loop(l, reply_bytes, log.then_some(out)))
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn accept_loop(l: TcpListener, reply_bytes: u64, out: Option<Arc<Mutex<std::io::Stdout>>>) {
    loop {
        match l.accept() {
            Ok((s, remote)) => {
                let out = out.clone();
                let spawned = std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || serve_one(s, remote, reply_bytes, out));
                if let Err(e) = spawned {
                    eprintln!("simpod serve: cannot start a thread for {remote}: {e}");
                }
            }
            // Transient (EMFILE, ECONNABORTED): keep serving.
            Err(e) => {
                eprintln!("simpod serve: accept on {:?}: {e}", l.local_addr());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve_one(
    mut s: TcpStream,
    remote: SocketAddr,
    reply_bytes: u64,
    out: Option<Arc<Mutex<std::io::Stdout>>>,
) {
    let local = s.local_addr().unwrap_or(remote);
    let mut received = 0u64;
    let mut sent = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    let mut err = None;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                err = Some(format!("read: {e}"));
                break;
            }
        }
    }
    if err.is_none() {
        match write_zeros(&mut s, reply_bytes) {
            Ok(()) => sent = reply_bytes,
            Err(e) => err = Some(format!("write: {e}")),
        }
    }
    drop(s);
    if let Some(out) = out {
        let rec = Served {
            local,
            remote,
            received,
            sent,
            error: err,
        };
        if let Ok(line) = serde_json::to_string(&rec) {
            let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(o, "{line}");
            let _ = o.flush();
        }
    }
}

fn write_zeros(s: &mut TcpStream, mut n: u64) -> std::io::Result<()> {
    let buf = [0u8; 16 * 1024];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k])?;
        n -= k as u64;
    }
    Ok(())
}

fn connect(
    to: SocketAddr,
    count: u64,
    send: u64,
    concurrency: u32,
    timeout: Duration,
    hold: Duration,
) -> Result<()> {
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<ConnRecord>();
    let workers: Vec<_> = (0..concurrency.min(count.max(1) as u32))
        .map(|_| {
            let (next, tx) = (next.clone(), tx.clone());
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    if tx.send(one_connection(to, send, timeout, hold)).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let pid = std::process::id();
    let mut sum = Summary {
        summary: true,
        pid,
        ..Summary::default()
    };
    let stdout = std::io::stdout();
    let mut o = std::io::BufWriter::new(stdout.lock());
    for rec in rx {
        sum.total += 1;
        match rec.result {
            ConnResult::Ok => sum.ok += 1,
            ConnResult::Refused => sum.refused += 1,
            ConnResult::Timeout => sum.timeout += 1,
            ConnResult::Unreachable => sum.unreachable += 1,
            ConnResult::Error => sum.error += 1,
        }
        writeln!(o, "{}", serde_json::to_string(&rec)?).context("write record")?;
    }
    for w in workers {
        let _ = w.join();
    }
    sum.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    writeln!(o, "{}", serde_json::to_string(&sum)?).context("write summary")?;
    o.flush().context("flush stdout")?;
    Ok(())
}

fn classify(e: &std::io::Error) -> ConnResult {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => ConnResult::Refused,
        Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) => ConnResult::Timeout,
        Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => ConnResult::Unreachable,
        _ if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {
            ConnResult::Timeout
        }
        _ => ConnResult::Error,
    }
}

fn one_connection(to: SocketAddr, send: u64, timeout: Duration, hold: Duration) -> ConnRecord {
    let start = Instant::now();
    let mut rec = ConnRecord {
        local: None,
        remote: to,
        result: ConnResult::Ok,
        error: None,
        sent: 0,
        received: 0,
        pid: std::process::id(),
        duration_ms: 0.0,
    };
    let fail = |mut rec: ConnRecord, what: &str, e: std::io::Error| {
        rec.result = classify(&e);
        rec.error = Some(format!("{what}: {e}"));
        rec.duration_ms = start.elapsed().as_secs_f64() * 1e3;
        rec
    };
    let sock = match Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP)) {
        Ok(s) => s,
        Err(e) => return fail(rec, "socket", e),
    };
    // Non-blocking connect: the local port is bound as soon as the SYN is
    // queued, so even a refused or timed-out attempt reports its 4-tuple.
    if let Err(e) = sock.set_nonblocking(true) {
        return fail(rec, "set non-blocking", e);
    }
    let pending = match sock.connect(&to.into()) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
        Err(e) => {
            rec.local = local_of(&sock);
            return fail(rec, "connect", e);
        }
    };
    rec.local = local_of(&sock);
    if pending {
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            // SAFETY: one valid pollfd for the duration of the call.
            let n =
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return fail(rec, "poll", e);
            }
            if n == 0 {
                return fail(rec, "connect", std::io::Error::from(ErrorKind::TimedOut));
            }
            break;
        }
        match sock.take_error() {
            Ok(Some(e)) => return fail(rec, "connect", e),
            Err(e) => return fail(rec, "SO_ERROR", e),
            Ok(None) => {}
        }
    }
    if let Err(e) = sock.set_nonblocking(false) {
        return fail(rec, "set blocking", e);
    }
    let mut s: TcpStream = sock.into();
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    if !hold.is_zero() {
        std::thread::sleep(hold);
    }
    if let Err(e) = write_zeros(&mut s, send) {
        return fail(rec, "write", e);
    }
    rec.sent = send;
    if let Err(e) = s.shutdown(Shutdown::Write) {
        return fail(rec, "shutdown", e);
    }
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => rec.received += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return fail(rec, "read", e),
        }
    }
    drop(s);
    rec.duration_ms = start.elapsed().as_secs_f64() * 1e3;
    rec
}

fn local_of(s: &Socket) -> Option<SocketAddr> {
    s.local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .filter(|a| a.port() != 0)
}
