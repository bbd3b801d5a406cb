//! Traffic generators that run inside the simulated pods (started by the
//! bench through `Pod::spawn` as hidden subcommands of this binary):
//! `storm-server` accepts on many ports and closes each connection at once;
//! `storm-client` runs connect/read-EOF/close loops on many threads, each
//! connection on its own 4-tuple (explicit client port), paced or flat out;
//! `delay-client` opens paced connections one at a time and notes the wall
//! time each connect() returned. Each prints JSON on stdout for the bench.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

/// `storm-server`'s first stdout line.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServerReady {
    pub ready: bool,
    pub ports: Vec<u16>,
}

/// Accepts on every port with `threads` threads (one SO_REUSEPORT listener
/// per port and thread, polled), closing each accepted connection at once:
/// the server sends the first FIN, the client reads EOF and closes.
pub fn storm_server(ip: Ipv4Addr, ports: &[u16], threads: usize) -> Result<()> {
    let threads = threads.max(1);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for _ in 0..threads {
        let listeners = ports
            .iter()
            .map(|p| reuseport_listener(SocketAddrV4::new(ip, *p)))
            .collect::<Result<Vec<_>>>()?;
        let barrier = barrier.clone();
        handles.push(std::thread::spawn(move || {
            barrier.wait();
            accept_and_close(listeners)
        }));
    }
    barrier.wait();
    let ready = ServerReady {
        ready: true,
        ports: ports.to_vec(),
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&ready)?)?;
    out.flush()?;
    drop(out);
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn reuseport_listener(addr: SocketAddrV4) -> Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .with_context(|| format!("socket for {addr}"))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)
        .with_context(|| format!("SO_REUSEPORT on {addr}"))?;
    s.bind(&SocketAddr::V4(addr).into())
        .with_context(|| format!("bind {addr}"))?;
    s.listen(4096)
        .with_context(|| format!("listen on {addr}"))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn accept_and_close(listeners: Vec<Socket>) {
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: fds is a valid array of pollfd for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue; // EINTR
        }
        for pfd in fds.iter_mut().filter(|p| p.revents != 0) {
            pfd.revents = 0;
            loop {
                // SAFETY: accept4 on a listening socket we own; the new fd is
                // closed right away (no payload is ever exchanged).
                let fd = unsafe {
                    libc::accept4(
                        pfd.fd,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if fd < 0 {
                    break; // EAGAIN: drained (or a transient error: poll again)
                }
                // SAFETY: plain-integer arguments; the descriptor, if any, is ours.
                unsafe { libc::close(fd) };
            }
        }
    }
}

/// Options of `storm-client`.
#[derive(Debug, Clone)]
pub struct StormOpts {
    pub server_ip: Ipv4Addr,
    pub server_ports: Vec<u16>,
    pub client_ip: Ipv4Addr,
    /// Client ports to bind explicitly, `lo..=hi`.
    pub client_ports: (u16, u16),
    pub threads: usize,
    pub duration: Duration,
    /// Connections per second over all threads; 0 = as fast as possible.
    pub rate: u64,
    /// Index of the first 4-tuple to use (tuples are numbered, see `tuple`).
    pub first_index: u64,
    /// Write each completed connection's "client_port server_port" here.
    pub completed_file: Option<std::path::PathBuf>,
    /// Run every thread on this CPU only.
    pub pin_cpu: Option<usize>,
}

/// `storm-client`'s summary line.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct StormSummary {
    pub completed: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed_s: f64,
    pub per_sec: f64,
    /// One past the highest tuple index used: the next run's `first_index`.
    pub next_index: u64,
    /// The run stopped before its time because every 4-tuple had been used
    /// once: a tuple used twice in one run would make two connections one
    /// record set for the bench's matching.
    #[serde(default)]
    pub exhausted: bool,
}

/// How many distinct 4-tuples the options give: one run uses each at most once.
pub fn tuple_space(opts: &StormOpts) -> u64 {
    let span = u64::from(opts.client_ports.1.saturating_sub(opts.client_ports.0)) + 1;
    opts.server_ports.len() as u64 * span
}

/// The `i`-th 4-tuple: server ports cycle fastest, so consecutive
/// connections of one client port go to different server ports.
pub fn tuple(opts: &StormOpts, i: u64) -> (u16, u16) {
    let p = opts.server_ports.len() as u64;
    let span = u64::from(opts.client_ports.1 - opts.client_ports.0) + 1;
    let sport = opts.server_ports[(i % p) as usize];
    let cport = opts.client_ports.0 + ((i / p) % span) as u16;
    (cport, sport)
}

pub fn storm_client(opts: StormOpts) -> Result<()> {
    if opts.server_ports.is_empty() || opts.threads == 0 {
        bail!("storm-client needs at least one server port and one thread");
    }
    if let Some(cpu) = opts.pin_cpu {
        // Before the threads start: they inherit it.
        crate::env::pin_process(std::process::id(), Some(cpu))?;
    }
    let opts = Arc::new(opts);
    let start = Instant::now();
    let handles: Vec<_> = (0..opts.threads)
        .map(|t| {
            let opts = opts.clone();
            std::thread::spawn(move || storm_thread(&opts, t, start))
        })
        .collect();
    let mut sum = StormSummary {
        next_index: opts.first_index,
        ..Default::default()
    };
    let mut completed: Vec<u64> = Vec::new();
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("a storm thread panicked"))?;
        sum.completed += r.done.len() as u64;
        sum.errors += r.errors;
        if sum.first_error.is_none() {
            sum.first_error = r.first_error;
        }
        sum.next_index = sum.next_index.max(r.next_index);
        sum.exhausted |= r.exhausted;
        if opts.completed_file.is_some() {
            completed.extend(r.done);
        }
    }
    sum.elapsed_s = start.elapsed().as_secs_f64();
    sum.per_sec = sum.completed as f64 / sum.elapsed_s;
    if let Some(path) = &opts.completed_file {
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
        );
        for i in completed {
            let (c, s) = tuple(&opts, i);
            writeln!(w, "{c} {s}")?;
        }
        w.flush()?;
    }
    println!("{}", serde_json::to_string(&sum)?);
    Ok(())
}

struct ThreadResult {
    done: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    next_index: u64,
    exhausted: bool,
}

fn storm_thread(opts: &StormOpts, t: usize, start: Instant) -> ThreadResult {
    let threads = opts.threads as u64;
    let mut r = ThreadResult {
        done: Vec::new(),
        errors: 0,
        first_error: None,
        next_index: 0,
        exhausted: false,
    };
    let server_ip = opts.server_ip;
    let space = tuple_space(opts);
    let mut k: u64 = 0;
    loop {
        let now = start.elapsed();
        if now >= opts.duration {
            break;
        }
        // Past the space, tuples would repeat within this run.
        if k * threads + t as u64 >= space {
            r.exhausted = true;
            break;
        }
        if opts.rate > 0 {
            // The k-th connection of thread t is due at (k*T + t) / rate.
            let due = Duration::from_secs_f64((k * threads + t as u64) as f64 / opts.rate as f64);
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let i = opts.first_index + k * threads + t as u64;
        let (cport, sport) = tuple(opts, i);
        r.next_index = i + 1;
        match one_connection(
            SocketAddrV4::new(opts.client_ip, cport),
            SocketAddrV4::new(server_ip, sport),
        ) {
            Ok(()) => r.done.push(i),
            Err(e) => {
                r.errors += 1;
                r.first_error
                    .get_or_insert_with(|| format!("{cport} -> {sport}: {e}"));
            }
        }
        k += 1;
    }
    r
}

/// connect, read to the server's EOF, close: an orderly connection with no
/// payload. The client port is bound explicitly (SO_REUSEADDR lets one port
/// serve several server ports at once; the 4-tuple stays unique).
fn one_connection(local: SocketAddrV4, to: SocketAddrV4) -> std::io::Result<()> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::V4(local).into())?;
    // A blocking connect honours the send timeout: no hang on a lost SYN.
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.connect(&SocketAddr::V4(to).into())?;
    read_to_eof(&s)
}

fn read_to_eof(mut s: &Socket) -> std::io::Result<()> {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// One line of `delay-client` output per connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DelaySample {
    pub port: u16,
    /// Wall time (ns since the Unix epoch) right after connect() returned.
    pub established_ns: u64,
}

/// Paced single connections to `to`, each sending a small plaintext HTTP
/// request right after connect() (as a client-first protocol does: the
/// agent classifies encryption from these first bytes), half-closing and
/// reading the answer to EOF. Prints one [`DelaySample`] per completed
/// connection at the end (nothing is written while measuring).
pub fn delay_client(to: SocketAddr, count: u64, rate: f64) -> Result<()> {
    let start = Instant::now();
    let mut samples = Vec::with_capacity(count as usize);
    let mut errors = 0u64;
    for k in 0..count {
        let due = Duration::from_secs_f64(k as f64 / rate);
        let now = start.elapsed();
        if due > now {
            std::thread::sleep(due - now);
        }
        let attempt = || -> std::io::Result<DelaySample> {
            let s = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
            s.set_write_timeout(Some(Duration::from_secs(3)))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.connect(&to.into())?;
            let established_ns = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            let port = s
                .local_addr()?
                .as_socket()
                .map(|a| a.port())
                .unwrap_or_default();
            let mut req =
                b"GET /bench HTTP/1.1\r\nHost: backend\r\nUser-Agent: flowaudit-bench\r\n\r\n"
                    .to_vec();
            req.resize(64, b' ');
            (&s).write_all(&req)?;
            s.shutdown(std::net::Shutdown::Write)?;
            read_to_eof(&s)?;
            Ok(DelaySample {
                port,
                established_ns,
            })
        };
        match attempt() {
            Ok(sample) => samples.push(sample),
            Err(e) => {
                errors += 1;
                eprintln!("delay-client: connection {k} to {to}: {e}");
            }
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for s in &samples {
        writeln!(out, "{}", serde_json::to_string(s)?)?;
    }
    writeln!(
        out,
        "{{\"summary\":true,\"completed\":{},\"errors\":{errors}}}",
        samples.len()
    )?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuples_are_unique_over_the_space() {
        let opts = StormOpts {
            server_ip: Ipv4Addr::LOCALHOST,
            server_ports: vec![9000, 9001, 9002],
            client_ip: Ipv4Addr::LOCALHOST,
            client_ports: (10000, 10099),
            threads: 4,
            duration: Duration::ZERO,
            rate: 0,
            first_index: 0,
            completed_file: None,
            pin_cpu: None,
        };
        let all: std::collections::HashSet<_> = (0..300).map(|i| tuple(&opts, i)).collect();
        assert_eq!(all.len(), 300);
        assert_eq!(tuple(&opts, 0), (10000, 9000));
        assert_eq!(tuple(&opts, 4), (10001, 9001));
        assert_eq!(tuple_space(&opts), 300);
        assert_eq!(tuple(&opts, 300), tuple(&opts, 0), "wraps after the space");
    }

    #[test]
    fn a_run_stops_when_every_tuple_is_used() {
        // Nothing listens on port 1 of loopback: each attempt fails at once,
        // but it takes its tuple all the same.
        let opts = StormOpts {
            server_ip: Ipv4Addr::LOCALHOST,
            server_ports: vec![1, 2],
            client_ip: Ipv4Addr::LOCALHOST,
            client_ports: (61000, 61004),
            threads: 3,
            duration: Duration::from_secs(30),
            rate: 0,
            first_index: 7,
            completed_file: None,
            pin_cpu: None,
        };
        let start = Instant::now();
        let results: Vec<_> = (0..3).map(|t| storm_thread(&opts, t, start)).collect();
        assert!(start.elapsed() < Duration::from_secs(30), "stopped early");
        assert!(results.iter().all(|r| r.exhausted));
        let tried: u64 = results.iter().map(|r| r.done.len() as u64 + r.errors).sum();
        assert_eq!(tried, 10, "each of the 10 tuples once");
        assert_eq!(results.iter().map(|r| r.next_index).max(), Some(17));
    }
}
