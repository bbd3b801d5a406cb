//! Item 6: event delay, from a connection's completion on the client (wall
//! time right after connect() returned, taken in the client pod) to its
//! CONNECT event (the client socket's, EGRESS) arriving at a gRPC
//! subscriber of the agent's stream in this process. Each connection sends
//! a small plaintext HTTP request at once (the agent may hold a CONNECT
//! until its first payload bytes say plaintext, TLS or mTLS), to `simpod
//! serve`. Connections are paced one at a time: the delay of an otherwise
//! idle pipeline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};

use crate::Ctx;
use crate::env::{self, BenchAgent, BenchNode, DELAY_PORT};
use crate::grpc;
use crate::report::{BenchResult, median, percentile};
use crate::traffic::DelaySample;

pub fn event_delay(ctx: &Ctx, node: &BenchNode) -> Result<Vec<BenchResult>> {
    let load = ctx.note_other_load();
    let agent = BenchAgent::start(&ctx.agent, &ctx.dir.join("agent-delay"), &[])?;
    let arrivals: Arc<Mutex<HashMap<u16, u64>>> = Arc::default();
    let lost = Arc::new(Mutex::new(0u64));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
    let client_ip = node.client.ip4();
    let task = {
        let (addr, arrivals, lost) = (agent.grpc.clone(), arrivals.clone(), lost.clone());
        rt.spawn(async move {
            let mut l = 0u64;
            let r = grpc::follow_connects(
                &addr,
                DELAY_PORT,
                |ip, port, direction| {
                    let now = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_nanos() as u64;
                    if ip == client_ip && direction == grpc::DIRECTION_EGRESS {
                        arrivals
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(port)
                            .or_insert(now);
                    }
                    true
                },
                &mut l,
                sub_tx,
            )
            .await;
            *lost.lock().unwrap_or_else(|p| p.into_inner()) += l;
            r
        })
    };
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), sub_rx).await })
        .context("the gRPC subscription did not start within 30 s")?
        .ok();
    env::wait_until(
        "the agent counts the bench's subscriber",
        Duration::from_secs(30),
        || {
            agent
                .metric("flowaudit_stream_subscribers")
                .is_ok_and(|n| n >= 1.0)
        },
    )?;
    let to = node.server_addr(DELAY_PORT);
    eprintln!(
        "bench: event delay: {} connections at {}/s to {to}",
        ctx.delay_count, ctx.delay_rate
    );
    let out = node.run_in_client(&[
        "delay-client".into(),
        "--to".into(),
        to.to_string(),
        "--count".into(),
        ctx.delay_count.to_string(),
        "--rate".into(),
        ctx.delay_rate.to_string(),
    ])?;
    let samples: Vec<DelaySample> = out
        .lines()
        .filter(|l| !l.contains("\"summary\""))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("delay-client output")?;
    if samples.is_empty() {
        bail!("delay-client completed no connection");
    }
    let got = |a: &Arc<Mutex<HashMap<u16, u64>>>| {
        let m = a.lock().unwrap_or_else(|p| p.into_inner());
        samples.iter().filter(|s| m.contains_key(&s.port)).count()
    };
    // Give the last events time to arrive; a missing one is reported.
    let _ = env::wait_until(
        "every CONNECT event arrived",
        Duration::from_secs(10),
        || got(&arrivals) == samples.len(),
    );
    let lost_total = agent.metric("flowaudit_kernel_events_lost_total")?;
    agent.stop()?;
    // The stream ends with the agent; its task is not awaited further.
    drop(task);
    rt.shutdown_timeout(Duration::from_secs(2));
    let m = arrivals.lock().unwrap_or_else(|p| p.into_inner());
    let mut delays: Vec<f64> = samples
        .iter()
        .filter_map(|s| {
            let at = *m.get(&s.port)?;
            Some((at as f64 - s.established_ns as f64) / 1e6)
        })
        .collect();
    delays.sort_by(f64::total_cmp);
    if delays.is_empty() {
        bail!(
            "no CONNECT event of the {} delay connections arrived on the stream",
            samples.len()
        );
    }
    let missing = samples.len() - delays.len();
    let (p50, p99) = (median(&delays), percentile(&delays, 0.99));
    let max = delays.last().copied().unwrap_or(f64::NAN);
    let told_lost = *lost.lock().unwrap_or_else(|p| p.into_inner());
    let negative = if delays[0] < 0.0 {
        " (a negative delay: the client was descheduled between connect() returning and reading the clock)"
    } else {
        ""
    };
    let detail = format!(
        "{} connections paced at {}/s, one at a time, each sending a 64-byte plaintext HTTP request right \
         after connect(); from connect() returning in the client pod to the client socket's CONNECT event \
         arriving on a gRPC GetFlows subscriber (unix socket); \
         min {:.2} ms, median {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; {missing} events missing, \
         {told_lost} reported lost to the subscriber, kernel events lost {lost_total:.0}{negative}; {load}",
        samples.len(),
        ctx.delay_rate,
        delays[0]
    );
    Ok(vec![
        BenchResult::new("event_delay_p50", "Event delay, median", p50, "ms")
            .detail(detail.clone()),
        BenchResult::new("event_delay_p99", "Event delay, p99", p99, "ms")
            .target("under 10 ms", p99 < 10.0 && missing == 0)
            .detail(detail),
    ])
}
