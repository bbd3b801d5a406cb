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
}
