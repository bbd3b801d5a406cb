//! What every long-running command (`agent`, `relay`) sets up for its
//! process: the log format and subscriber, and the name it reports itself by.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `explicit` (a flag), else `$NODE_NAME`, else the hostname.
pub fn node_name(explicit: Option<&str>) -> String {
    if let Some(n) = explicit.filter(|n| !n.is_empty()) {
        return n.to_owned();
    }
    if let Ok(n) = std::env::var("NODE_NAME")
        && !n.is_empty()
    {
        return n;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// How long freed memory stays with the allocator before it goes back to
/// the system, in ms, unless `MIMALLOC_PURGE_DELAY` says otherwise: the
/// default of mimalloc 2 and of mimalloc 3's own header comment. mimalloc
/// 3, which the binary ships with, keeps it 1,000 ms: in a storm the agent
/// frees flows as fast as it makes them, and a second's worth of freed
/// pages stayed resident. Side by side on 2026-12-06 (15 s storms,
/// alternating): peak RSS 122.5 to 129.6 MiB with 1,000 ms (6 runs), 109.7
/// to 117.4 with 10 ms set here (4 runs), 107.5 and 108.2 with 0; agent CPU
/// per connection within the runs' spread (`docs/benchmarks.md`, item 3).
/// The price is page faults when freed pages are needed again (about
/// 2,700 a second at 35,000 connections a second, against under 100: if a
/// fault costs a microsecond, under 0.1 µs per connection, an estimate not
/// timed here); memory over a DaemonSet's limit kills the container, CPU
/// only throttles.
pub const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 10;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e`
/// (`c_src/mimalloc/v3/include/mimalloc.h` of libmimalloc-sys 0.1.49, the
/// version in Cargo.lock), which that crate's bindings do not name.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

// SAFETY: mimalloc's public option API (`mimalloc.h`), linked in with the
// global allocator; options are plain integers, safe to set at any time.
unsafe extern "C" {
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Sets [`ALLOCATOR_PURGE_DELAY_MS`] unless `MIMALLOC_PURGE_DELAY` is set
/// (then the allocator reads it, as its documentation says). Returns the
/// delay in force.
pub fn return_freed_memory_promptly() -> std::ffi::c_long {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: see the declaration; any value is valid for this option.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) };
    }
    // SAFETY: as above.
    let delay_ms = unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) };
    tracing::debug!(
        delay_ms,
        "allocator: freed memory goes back to the system after this delay"
    );
    delay_ms
}

/// An error with its causes, each said once (`a: b: c`), for the one line
/// a command prints when it fails.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !last.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        last = part;
    }
    text
}

/// An error the JSON log already holds: `main` only sets the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Logged(pub String);

/// Ends a long-running command (`agent`, `relay`). With JSON logs, the
/// error that ends it is one more JSON line (`level` ERROR, `error` the
/// whole cause), not printed again as plain text: the one line that says
/// why the process stopped is the one a JSON log pipeline must read.
pub fn end_with(result: anyhow::Result<()>, format: LogFormat, what: &str) -> anyhow::Result<()> {
    match (result, format) {
        (Err(e), LogFormat::Json) => {
            let text = error_text(&e);
            tracing::error!(error = %text, "{what} stopped");
            Err(Logged(text).into())
        }
        (r, _) => r,
    }
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOWAUDIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// A future running on a thread of its own, in a single-threaded tokio
/// runtime (timers and I/O enabled): the agent's flows go from the ring
/// reader to the pipeline there, so a batch passes between the two within
/// one thread (no other worker woken for it), and the gRPC side's tasks on
/// the main runtime's workers never queue in front of them.
pub struct OwnThread<T> {
    /// None once the outcome was taken.
    done: Option<tokio::sync::oneshot::Receiver<Result<T, String>>>,
    name: String,
}

/// Starts `future` on a new thread `name`. Fails (naming the thread) when the
/// runtime or the thread cannot be made.
pub fn spawn_own_thread<F>(name: &str, future: F) -> anyhow::Result<OwnThread<F::Output>>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    use anyhow::Context as _;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .with_context(|| format!("cannot make the runtime of the {name} thread"))?;
    let (tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // The panic's message goes to the waiting side, which says it.
            let run = std::panic::AssertUnwindSafe(|| runtime.block_on(future));
            let output = std::panic::catch_unwind(run).map_err(|p| panic_message(p.as_ref()));
            let _ = tx.send(output);
        })
        .with_context(|| format!("cannot start the {name} thread"))?;
    Ok(OwnThread {
        done: Some(done),
        name: name.to_owned(),
    })
}

impl<T> OwnThread<T> {
    /// Waits for the future's output; Err when it panicked, with the
    /// panic's message. Cancel-safe (a `select!` branch); once it has
    /// returned, later calls are an error at once.
    pub async fn finished(&mut self) -> anyhow::Result<T> {
        let Some(done) = &mut self.done else {
            anyhow::bail!("the {} thread's outcome was already taken", self.name);
        };
        let outcome = done.await;
        self.done = None;
        match outcome {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(why)) => anyhow::bail!("the {} thread failed: {why}", self.name),
            // Only a thread killed without unwinding drops the sender unsent.
            Err(_) => anyhow::bail!("the {} thread ended without a result", self.name),
        }
    }
}

/// A named task for `run_tasks`.
pub type NamedTask = (
    &'static str,
    std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
);

/// Runs each future as a task of the current runtime and waits for all of
/// them. Err names a task that panicked, with the panic's message.
pub async fn run_tasks(tasks: Vec<NamedTask>) -> anyhow::Result<()> {
    let handles: Vec<_> = tasks
        .into_iter()
        .map(|(name, task)| (name, tokio::spawn(task)))
        .collect();
    let mut failed = None;
    for (name, handle) in handles {
        if let Err(e) = handle.await {
            let why = match e.try_into_panic() {
                Ok(payload) => panic_message(payload.as_ref()),
                Err(e) => e.to_string(),
            };
            failed.get_or_insert(format!("the {name} failed: {why}"));
        }
    }
    match failed {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

/// How long a connection must have lasted for the reconnect [`Backoff`] to
/// start again from its first wait.
pub const STAYED_UP: std::time::Duration = std::time::Duration::from_secs(10);

/// The waits before reconnecting to a server (SPIRE, an agent the relay
/// follows, the one `observe -f` follows): doubled after each attempt up to
/// `max`, and back to `initial` only after a connection that stayed up
/// [`STAYED_UP`]. One dropped at once backs off as a failed connect does:
/// a server that accepts and then drops (or refuses the call on) each
/// connection would otherwise be dialled at the shortest wait for ever.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: std::time::Duration,
    max: std::time::Duration,
    next: std::time::Duration,
}

impl Backoff {
    pub fn new(initial: std::time::Duration, max: std::time::Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The wait before the next attempt, after a connection that lasted
    /// `lasted` (`None`: the attempt failed); the wait after it is twice as
    /// long, up to `max`.
    pub fn next(&mut self, lasted: Option<std::time::Duration>) -> std::time::Duration {
        if lasted.is_some_and(|l| l >= STAYED_UP) {
            self.next = self.initial;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }
}

/// Tasks that follow the agent's inputs for as long as it runs (the policy
/// and endpoint-directory watchers): none of them ends on its own. One
/// that panicked, or returned, leaves the agent ready and judging by a
/// state nobody updates any more, which nothing but a log line would tell;
/// [`Watchers::ended`] says which one stopped and why, so the agent can stop
/// too (and its DaemonSet starts it again, following its inputs afresh).
#[derive(Default)]
pub struct Watchers {
    tasks: tokio::task::JoinSet<()>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
}

impl Watchers {
    /// Runs `task` on the current runtime, known as `name` (e.g. "policy
    /// watcher").
    pub fn spawn(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits until a task ends and says which and how; never ready while
    /// none runs. Cancel-safe (a `select!` branch).
    pub async fn ended(&mut self) -> anyhow::Error {
        let Some(ended) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, why) = match ended {
            Ok((id, ())) => (id, "it returned".to_owned()),
            Err(e) => {
                let id = e.id();
                match e.try_into_panic() {
                    Ok(payload) => (
                        id,
                        format!("it panicked: {}", panic_message(payload.as_ref())),
                    ),
                    Err(e) => (id, e.to_string()),
                }
            }
        };
        let name = self.names.remove(&id).unwrap_or("a watcher");
        anyhow::anyhow!("the {name} stopped ({why}): its input is no longer followed")
    }
}

/// The message of a panic's payload (a `&str` or `String`, as `panic!`
/// makes them).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is mimalloc 3's purge delay: it reads that
    /// option's default (or what the environment set) before, and the
    /// agent's value after, unless the environment set one.
    #[test]
    fn the_allocator_gives_freed_memory_back_within_its_delay() {
        let from_env = std::env::var("MIMALLOC_PURGE_DELAY").ok();
        // SAFETY: see the declaration.
        let before = unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) };
        let expected_before = from_env.as_deref().map_or(Ok(1000), str::parse);
        assert_eq!(
            Ok(before),
            expected_before,
            "option {MI_OPTION_PURGE_DELAY} should be mimalloc 3's purge_delay (default 1000 ms; MIMALLOC_PURGE_DELAY={from_env:?})"
        );
        let now = return_freed_memory_promptly();
        match from_env {
            None => assert_eq!(now, ALLOCATOR_PURGE_DELAY_MS),
            // The environment wins, as mimalloc documents.
            Some(_) => assert_eq!(now, before),
        }
        // SAFETY: as above.
        assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, now);
    }

    #[tokio::test]
    async fn a_future_runs_on_its_named_thread_and_its_output_comes_back() {
        let mut t = spawn_own_thread("fa-test-own", async {
            // Its own runtime, with timers.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            std::thread::current().name().map(str::to_owned)
        })
        .unwrap();
        let name = t.finished().await.unwrap();
        assert_eq!(name.as_deref(), Some("fa-test-own"));
        assert_ne!(
            std::thread::current().name(),
            Some("fa-test-own"),
            "the caller's thread is another"
        );
    }

    #[tokio::test]
    async fn a_thread_that_panics_is_an_error_with_the_panic_message() {
        let mut t = spawn_own_thread("fa-test-panic", async {
            panic!("the ring is on fire");
        })
        .unwrap();
        let e = t.finished().await.unwrap_err().to_string();
        assert_eq!(e, "the fa-test-panic thread failed: the ring is on fire");
        let again = t.finished().await.unwrap_err().to_string();
        assert!(again.contains("already taken"), "{again}");
    }

    #[tokio::test]
    async fn a_panicking_task_is_named_and_the_others_finish() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = done.clone();
        let result = run_tasks(vec![
            (
                "reader",
                Box::pin(async move {
                    let _tx = tx;
                    panic!("bad record {}", 7);
                }),
            ),
            (
                "pipeline",
                Box::pin(async move {
                    // Ends when the reader's end of the channel is gone.
                    while rx.recv().await.is_some() {}
                    seen.store(true, std::sync::atomic::Ordering::SeqCst);
                }),
            ),
        ])
        .await;
        let e = result.unwrap_err().to_string();
        assert_eq!(e, "the reader failed: bad record 7");
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
        run_tasks(vec![("quiet", Box::pin(async {}))])
            .await
            .unwrap();
    }

    #[test]
    fn reconnects_back_off_until_a_connection_stays_up() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(200), Duration::from_secs(5));
        // Failed connects, then connections dropped at once: the wait grows
        // all the same.
        let waits: Vec<Duration> = [
            None,
            None,
            Some(ms(30)),
            Some(ms(30)),
            None,
            Some(ms(9_999)),
        ]
        .into_iter()
        .map(|lasted| b.next(lasted))
        .collect();
        assert_eq!(
            waits,
            [ms(200), ms(400), ms(800), ms(1600), ms(3200), ms(5000)]
        );
        assert_eq!(b.next(None), ms(5000), "never past the longest wait");
        // A connection that stayed up starts again from the first wait.
        assert_eq!(b.next(Some(STAYED_UP)), ms(200));
        assert_eq!(b.next(None), ms(400));
    }

    #[tokio::test]
    async fn a_watcher_that_panics_or_returns_is_named_and_none_is_never_ready() {
        let mut none = Watchers::default();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), none.ended()).await;
        assert!(waited.is_err(), "no watcher, nothing ended");

        let mut w = Watchers::default();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        w.spawn("policy watcher", async move {
            let _ = wait.await;
            panic!("version {} unreadable", 3);
        });
        w.spawn("endpoints watcher", std::future::pending());
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), w.ended()).await;
        assert!(early.is_err(), "both still run");
        go.send(()).unwrap();
        assert_eq!(
            w.ended().await.to_string(),
            "the policy watcher stopped (it panicked: version 3 unreadable): its input is no longer followed"
        );

        let mut r = Watchers::default();
        r.spawn("Kubernetes watcher", async {});
        assert_eq!(
            r.ended().await.to_string(),
            "the Kubernetes watcher stopped (it returned): its input is no longer followed"
        );
    }
}
