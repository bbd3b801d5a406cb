//! A stand-in for the Kubernetes API server, as far as a pod and node
//! watcher needs one: real HTTP/1.1 on 127.0.0.1:<ephemeral port> (no TLS,
//! no auth), serving the core/v1 `pods` and `nodes` collections:
//!
//! - `GET /api/v1/pods`, `/api/v1/namespaces/<ns>/pods`, `/api/v1/nodes`:
//!   a `PodList`/`NodeList` with `metadata.resourceVersion`; `limit` and
//!   `continue` page through a snapshot taken by the first page.
//! - the same with `watch=true`: a chunked response of newline-delimited
//!   `WatchEvent` objects (`{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR",
//!   "object":{...}}`) held open until `timeoutSeconds` (or the stand-in's
//!   cap, see [`KubeStandin::set_watch_timeout_cap`]). `resourceVersion=N`
//!   replays every change after N first; an empty one or `0` starts with a
//!   synthetic `ADDED` per existing object; one older than the compacted
//!   history ([`KubeStandin::expire_history`]) gets a `410 Expired` ERROR
//!   event, as the real API does, so the watcher re-lists.
//!   `allowWatchBookmarks=true` adds a `BOOKMARK` every
//!   [`KubeStandin::set_bookmark_interval`]; `sendInitialEvents=true` (the
//!   streaming-list mode) ends the initial events with the
//!   `k8s.io/initial-events-end` bookmark.
//! - `GET /version`; anything else is a 404 `Status`.
//!
//! Objects are real Kubernetes JSON (`metadata`, `spec.serviceAccountName`,
//! `spec.nodeName`, `spec.hostNetwork`, `status.podIP`, `status.podIPs`,
//! `status.phase`; node `status.addresses`), so a client deserializes them
//! with its ordinary types and never knows it talks to a double.
//!
//! The server runs on its own small tokio runtime, so the stand-in works
//! from plain `#[test]`s and from inside `#[tokio::test]`s alike; every
//! method is synchronous and quick. [`KubeStandin::stop`] closes the
//! listener and every open connection (watches included);
//! [`KubeStandin::restart`] listens again on the same port with the same
//! objects and history.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::scenario::{NODE_NAME, Precinct99};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Which collection an object belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Pod,
    Node,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Node => "Node",
        }
    }
}

/// A pod to serve; [`StandinPod::to_json`] renders it as the API does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandinPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    /// `status.podIPs` (the first is also `status.podIP`); empty: no IP yet.
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: the pod uses the node's addresses.
    pub host_network: bool,
    /// `status.phase` (`Running` unless set).
    pub phase: String,
}

impl StandinPod {
    pub fn new(namespace: &str, name: &str, uid: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
            service_account: "default".into(),
            labels: BTreeMap::new(),
            node: NODE_NAME.into(),
            ips: Vec::new(),
            host_network: false,
            phase: "Running".into(),
        }
    }
    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.into();
        self
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }
    pub fn node(mut self, node: &str) -> Self {
        self.node = node.into();
        self
    }
    pub fn ips(mut self, ips: &[IpAddr]) -> Self {
        self.ips = ips.to_vec();
        self
    }
    pub fn host_network(mut self, on: bool) -> Self {
        self.host_network = on;
        self
    }
    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.into();
        self
    }

    /// The pod as Kubernetes JSON, at resource version `rv`.
    pub fn to_json(&self, rv: u64) -> Value {
        let mut status = json!({
            "phase": self.phase,
            "hostIP": "",
            "podIPs": self.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
        });
        if let Some(first) = self.ips.first() {
            status["podIP"] = json!(first.to_string());
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "resourceVersion": rv.to_string(),
                "creationTimestamp": "2024-05-01T12:00:00Z",
                "labels": self.labels,
            },
            "spec": {
                "serviceAccountName": self.service_account,
                "serviceAccount": self.service_account,
                "nodeName": self.node,
                "hostNetwork": self.host_network,
                "containers": [{"name": "main", "image": format!("registry.invalid/{}:1", self.name)}],
            },
            "status": status,
        })
    }
}

/// The precinct-99 workloads of `sim` as pods (real UIDs, so the agent's
/// cgroup resolver finds them), on [`NODE_NAME`].
pub fn precinct99_pods(sim: &Precinct99) -> Vec<StandinPod> {
    sim.workloads
        .iter()
        .map(|w| {
            let p = &w.pod;
            let mut pod = StandinPod::new(p.namespace(), p.name(), p.uid())
                .service_account(p.service_account())
                .ips(&[IpAddr::V4(p.ip4()), IpAddr::V6(p.ip6())]);
            pod.labels = p.labels().clone();
            pod
        })
        .collect()
}

#[derive(Debug, Clone)]
struct HistEvent {
    rv: u64,
    kind: Kind,
    namespace: String,
    typ: &'static str,
    object: Arc<Value>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from a resourceVersion older than this get 410 Expired.
    compacted: u64,
    pods: BTreeMap<String, StandinPod>,
    /// Pod JSON as last served (resourceVersion included), by UID.
    pod_objects: BTreeMap<String, Arc<Value>>,
    nodes: BTreeMap<String, Arc<Value>>,
    history: Vec<HistEvent>,
    /// List snapshots being paged through, by continue token.
    pages: HashMap<String, (u64, Vec<Arc<Value>>)>,
    next_token: u64,
    bookmark_interval: Duration,
    watch_cap: Option<Duration>,
    requests: Vec<String>,
}

impl State {
    fn objects(&self, kind: Kind, namespace: Option<&str>) -> Vec<Arc<Value>> {
        match kind {
            Kind::Pod => self
                .pod_objects
                .values()
                .filter(|o| namespace.is_none_or(|ns| o["metadata"]["namespace"] == ns))
                .cloned()
                .collect(),
            Kind::Node => self.nodes.values().cloned().collect(),
        }
    }

    fn record(&mut self, kind: Kind, typ: &'static str, object: Value) -> Arc<Value> {
        let object = Arc::new(object);
        self.history.push(HistEvent {
            rv: self.rv,
            kind,
            namespace: object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            typ,
            object: object.clone(),
        });
        object
    }
}

struct Shared {
    state: Mutex<State>,
    /// The current resourceVersion, for open watches to wake on.
    rv_tx: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Server {
    task: JoinHandle<()>,
    gone: std::sync::mpsc::Receiver<()>,
}

/// The stand-in; dropped, it stops serving.
pub struct KubeStandin {
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    server: Mutex<Option<Server>>,
}

impl KubeStandin {
    /// Starts serving on 127.0.0.1 with an ephemeral port, with no objects.
    pub fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kube-standin")
            .enable_all()
            .build()
            .expect("kube-standin: build its tokio runtime");
        let (rv_tx, _) = watch::channel(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                bookmark_interval: Duration::from_secs(1),
                ..State::default()
            }),
            rv_tx,
        });
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("kube-standin: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("kube-standin: local address");
        let standin = Self {
            shared,
            rt: Some(rt),
            addr,
            server: Mutex::new(None),
        };
        standin.serve(listener);
        standin
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig whose current context points at the stand-in over
    /// plain HTTP, with no credentials.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n  - name: kube-standin\n    cluster:\n      server: {}\ncontexts:\n  - name: kube-standin\n    context:\n      cluster: kube-standin\n      user: kube-standin\n      namespace: default\ncurrent-context: kube-standin\nusers:\n  - name: kube-standin\n    user: {{}}\npreferences: {{}}\n",
            self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// Adds (or replaces, by UID) a pod; returns the new resourceVersion.
    pub fn add_pod(&self, pod: StandinPod) -> u64 {
        self.change(|s| {
            let typ = if s.pods.contains_key(&pod.uid) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            let obj = s.record(Kind::Pod, typ, pod.to_json(s.rv));
            s.pod_objects.insert(pod.uid.clone(), obj);
            s.pods.insert(pod.uid.clone(), pod);
            true
        })
    }

    /// Changes a pod (by UID) with `f` and sends MODIFIED; false if no such pod.
    pub fn update_pod(&self, uid: &str, f: impl FnOnce(&mut StandinPod)) -> bool {
        let mut found = false;
        self.change(|s| {
            let Some(mut pod) = s.pods.get(uid).cloned() else {
                return false;
            };
            f(&mut pod);
            pod.uid = uid.to_owned();
            let obj = s.record(Kind::Pod, "MODIFIED", pod.to_json(s.rv));
            s.pod_objects.insert(uid.to_owned(), obj);
            s.pods.insert(uid.to_owned(), pod);
            found = true;
            true
        });
        found
    }

    /// Replaces a pod's labels (as `kubectl label --overwrite` would).
    pub fn update_pod_labels(&self, uid: &str, labels: &[(&str, &str)]) -> bool {
        self.update_pod(uid, |p| {
            p.labels = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        })
    }

    /// Deletes a pod (DELETED carries its last state); false if no such pod.
    pub fn delete_pod(&self, uid: &str) -> bool {
        let mut found = false;
        self.change(|s| {
            let Some(pod) = s.pods.remove(uid) else {
                return false;
            };
            s.pod_objects.remove(uid);
            s.record(Kind::Pod, "DELETED", pod.to_json(s.rv));
            found = true;
            true
        });
        found
    }

    /// Adds (or replaces) a node with these InternalIP addresses.
    pub fn add_node(&self, name: &str, ips: &[IpAddr]) -> u64 {
        let mut addresses: Vec<Value> = ips
            .iter()
            .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
            .collect();
        addresses.push(json!({"type": "Hostname", "address": name}));
        self.change(|s| {
            let typ = if s.nodes.contains_key(name) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            let obj = json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "uid": format!("node-{name}"),
                    "resourceVersion": s.rv.to_string(),
                    "creationTimestamp": "2024-05-01T12:00:00Z",
                    "labels": {"kubernetes.io/hostname": name},
                },
                "status": {"addresses": addresses},
            });
            let obj = s.record(Kind::Node, typ, obj);
            s.nodes.insert(name.to_owned(), obj);
            true
        })
    }

    pub fn delete_node(&self, name: &str) -> bool {
        let mut found = false;
        self.change(|s| {
            let Some(obj) = s.nodes.remove(name) else {
                return false;
            };
            let mut obj = (*obj).clone();
            obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.record(Kind::Node, "DELETED", obj);
            found = true;
            true
        });
        found
    }

    /// Serves the precinct-99 node (its bridge addresses) and workloads.
    pub fn serve_precinct99(&self, sim: &Precinct99) {
        self.add_node(
            NODE_NAME,
            &[IpAddr::V4(sim.node.ip4()), IpAddr::V6(sim.node.ip6())],
        );
        for pod in precinct99_pods(sim) {
            self.add_pod(pod);
        }
    }

    /// The pods being served, by UID.
    pub fn pods(&self) -> BTreeMap<String, StandinPod> {
        self.shared.lock().pods.clone()
    }

    /// Compacts the history: watches resuming from any resourceVersion
    /// before now get `410 Expired` and must re-list.
    pub fn expire_history(&self) {
        let mut s = self.shared.lock();
        s.compacted = s.rv;
        s.history.clear();
    }

    /// How often open watches that asked for bookmarks get one (1 s unless set).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.lock().bookmark_interval = every;
    }

    /// Ends every watch after at most `cap`, whatever its timeoutSeconds
    /// (the real API also ends watches on its own).
    pub fn set_watch_timeout_cap(&self, cap: Option<Duration>) {
        self.shared.lock().watch_cap = cap;
    }

    /// Every request so far, as `METHOD /path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    pub fn is_running(&self) -> bool {
        self.server_slot().is_some()
    }

    /// Stops listening and closes every open connection (watches end
    /// mid-stream, as when the API server goes away). Objects stay.
    pub fn stop(&self) {
        let Some(server) = self.server_slot().take() else {
            return;
        };
        server.task.abort();
        // The listener is closed once the aborted task is dropped.
        let _ = server.gone.recv_timeout(Duration::from_secs(5));
    }

    /// Listens again on the same port, with the same objects and history.
    pub fn restart(&self) {
        if self.is_running() {
            return;
        }
        let mut tries = 0;
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("kube-standin: listen again on {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn server_slot(&self) -> MutexGuard<'_, Option<Server>> {
        self.server.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn change(&self, f: impl FnOnce(&mut State) -> bool) -> u64 {
        let mut s = self.shared.lock();
        s.rv += 1;
        if !f(&mut s) {
            s.rv -= 1;
        }
        let rv = s.rv;
        drop(s);
        self.shared.rv_tx.send_replace(rv);
        rv
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("kube-standin: non-blocking listener");
        let (gone_tx, gone) = std::sync::mpsc::channel();
        let shared = self.shared.clone();
        let rt = self
            .rt
            .as_ref()
            .expect("runtime lives as long as the stand-in");
        let task = rt.spawn(async move {
            // Sends when this task is dropped (after the listener and the
            // connections, declared later, are gone).
            let _gone = DropSignal(gone_tx);
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("kube-standin: {e}");
                    return;
                }
            };
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let shared = shared.clone();
                        conns.spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                let shared = shared.clone();
                                async move { Ok::<_, Infallible>(handle(&shared, req)) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        *self.server_slot() = Some(Server { task, gone });
    }
}

impl Drop for KubeStandin {
    fn drop(&mut self) {
        if let Some(server) = self.server_slot().take() {
            server.task.abort();
        }
        if let Some(rt) = self.rt.take() {
            // Safe from inside another runtime, unlike dropping it.
            rt.shutdown_background();
        }
    }
}

struct DropSignal(std::sync::mpsc::Sender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .expect("valid response")
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(code, status_body(code.as_u16(), reason, message))
}

fn query_params(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                match (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(h), Some(l)) => {
                        out.push(h << 4 | l);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(shared: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    shared.lock().requests.push(format!(
        "{} {}{}",
        req.method(),
        path,
        query
            .as_deref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default()
    ));
    if req.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the kube stand-in serves GET only",
        );
    }
    if path == "/version" {
        return full(
            StatusCode::OK,
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-flowaudit-standin", "platform": "linux/amd64"}),
        );
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (kind, namespace) = match segs.as_slice() {
        ["api", "v1", "pods"] => (Kind::Pod, None),
        ["api", "v1", "namespaces", ns, "pods"] => (Kind::Pod, Some((*ns).to_owned())),
        ["api", "v1", "nodes"] => (Kind::Node, None),
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("the server could not find the requested resource ({path})"),
            );
        }
    };
    let q = query_params(query.as_deref());
    if q.get("watch").is_some_and(|v| v == "true" || v == "1") {
        watch_response(shared, kind, namespace, &q)
    } else {
        list_response(shared, kind, namespace.as_deref(), &q)
    }
}

fn list_response(
    shared: &Shared,
    kind: Kind,
    namespace: Option<&str>,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let mut s = shared.lock();
    let (rv, mut items) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match s.pages.remove(token) {
            Some(page) => page,
            None => {
                drop(s);
                return error(
                    StatusCode::GONE,
                    "Expired",
                    "the provided continue parameter is too old",
                );
            }
        },
        None => (s.rv, s.objects(kind, namespace)),
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let mut cont = String::new();
    if let Some(limit) = limit
        && items.len() > limit
    {
        let rest = items.split_off(limit);
        s.next_token += 1;
        cont = format!("page{}", s.next_token);
        s.pages.insert(cont.clone(), (rv, rest));
    }
    drop(s);
    let items: Vec<Value> = items
        .iter()
        .map(|o| {
            // List items carry no apiVersion/kind, as from the real API.
            let mut o = (**o).clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if !cont.is_empty() {
        metadata["continue"] = json!(cont);
    }
    full(
        StatusCode::OK,
        json!({
            "apiVersion": "v1",
            "kind": format!("{}List", kind.name()),
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn event_line(typ: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": typ, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark(kind: Kind, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"apiVersion": "v1", "kind": kind.name(), "metadata": metadata}),
    )
}

struct WatchState {
    shared: Arc<Shared>,
    kind: Kind,
    namespace: Option<String>,
    cursor: u64,
    rx: watch::Receiver<u64>,
    deadline: tokio::time::Instant,
    bookmarks: bool,
    next_bookmark: tokio::time::Instant,
    pending: std::collections::VecDeque<Bytes>,
    done: bool,
}

impl WatchState {
    fn matches(&self, e: &HistEvent) -> bool {
        e.kind == self.kind && self.namespace.as_deref().is_none_or(|ns| e.namespace == ns)
    }

    /// Queues every event after the cursor; true if any.
    fn collect(&mut self) -> bool {
        let s = self.shared.lock();
        let start = s.history.partition_point(|e| e.rv <= self.cursor);
        for e in &s.history[start..] {
            if self.matches(e) {
                self.pending.push_back(event_line(e.typ, &e.object));
            }
        }
        self.cursor = self.cursor.max(s.rv);
        !self.pending.is_empty()
    }

    async fn next(mut self) -> Option<(Result<Frame<Bytes>, Infallible>, Self)> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some((Ok(Frame::data(line)), self));
            }
            if self.done {
                return None;
            }
            // Mark the current value seen before looking, so a change made
            // after the look still wakes us.
            self.rx.borrow_and_update();
            if self.collect() {
                continue;
            }
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(self.deadline) => return None,
                _ = tokio::time::sleep_until(self.next_bookmark), if self.bookmarks => {
                    let every = self.shared.lock().bookmark_interval;
                    self.next_bookmark = tokio::time::Instant::now() + every;
                    self.pending.push_back(bookmark(self.kind, self.cursor, false));
                }
            }
        }
    }
}

fn watch_response(
    shared: &Arc<Shared>,
    kind: Kind,
    namespace: Option<String>,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let rv_param = q.get("resourceVersion").cloned().unwrap_or_default();
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let initial_events = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let s = shared.lock();
    let timeout = s.watch_cap.map_or(timeout, |cap| timeout.min(cap));
    let mut pending = std::collections::VecDeque::new();
    let mut done = false;
    let cursor = if rv_param.is_empty() || rv_param == "0" || initial_events {
        // Start with the current state.
        for o in s.objects(kind, namespace.as_deref()) {
            pending.push_back(event_line("ADDED", &o));
        }
        if initial_events {
            pending.push_back(bookmark(kind, s.rv, true));
        }
        s.rv
    } else {
        match rv_param.parse::<u64>() {
            Ok(rv) if rv < s.compacted => {
                pending.push_back(event_line(
                    "ERROR",
                    &status_body(
                        410,
                        "Expired",
                        &format!("too old resource version: {rv} ({})", s.compacted),
                    ),
                ));
                done = true;
                rv
            }
            Ok(rv) => rv,
            Err(_) => {
                drop(s);
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid resource version {rv_param:?}"),
                );
            }
        }
    };
    let every = s.bookmark_interval;
    drop(s);
    let now = tokio::time::Instant::now();
    let state = WatchState {
        shared: shared.clone(),
        kind,
        namespace,
        cursor,
        rx: shared.rv_tx.subscribe(),
        deadline: now + timeout,
        bookmarks,
        next_bookmark: now + every,
        pending,
        done,
    };
    let body = StreamBody::new(futures_util::stream::unfold(state, WatchState::next));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(body.boxed_unsync())
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Db+c"), "a=b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn pod_json_has_the_api_shape() {
        let p = StandinPod::new("ns", "web-1", "u-1")
            .service_account("web")
            .label("app", "web")
            .ips(&["10.1.2.3".parse().unwrap(), "fd00::3".parse().unwrap()]);
        let v = p.to_json(7);
        assert_eq!(v["metadata"]["resourceVersion"], "7");
        assert_eq!(v["spec"]["serviceAccountName"], "web");
        assert_eq!(v["status"]["podIP"], "10.1.2.3");
        assert_eq!(v["status"]["podIPs"][1]["ip"], "fd00::3");
        assert_eq!(v["metadata"]["labels"]["app"], "web");
    }

    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        crate::agent::http_get(addr, path)
    }

    #[test]
    fn lists_pages_and_watches() {
        let k = KubeStandin::start();
        k.add_node("n1", &["192.0.2.1".parse().unwrap()]);
        for i in 0..3 {
            k.add_pod(
                StandinPod::new("a", &format!("p{i}"), &format!("u{i}")).ips(&[format!(
                    "10.0.0.{i}"
                )
                .parse()
                .unwrap()]),
            );
        }
        let (code, body) = get(k.addr(), "/api/v1/pods?limit=2");
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["items"].as_array().unwrap().len(), 2);
        let rv = v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned();
        let cont = v["metadata"]["continue"].as_str().unwrap().to_owned();
        let (_, body) = get(k.addr(), &format!("/api/v1/pods?limit=2&continue={cont}"));
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["items"].as_array().unwrap().len(), 1);
        assert!(v["metadata"].get("continue").is_none());
        assert_eq!(v["metadata"]["resourceVersion"], rv.as_str());
        // A watch from the list's version sees later changes, then ends at
        // its timeout (HTTP/1.0 reads to EOF).
        k.delete_pod("u1");
        let (code, body) = get(
            k.addr(),
            &format!("/api/v1/pods?watch=true&resourceVersion={rv}&timeoutSeconds=1"),
        );
        assert_eq!(code, 200);
        let lines: Vec<Value> = body
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{body}");
        assert_eq!(lines[0]["type"], "DELETED");
        assert_eq!(lines[0]["object"]["metadata"]["uid"], "u1");
        // Compacted history: 410 Expired.
        k.expire_history();
        let (_, body) = get(
            k.addr(),
            &format!("/api/v1/pods?watch=true&resourceVersion={rv}&timeoutSeconds=1"),
        );
        assert!(body.contains("\"code\":410"), "{body}");
        let (code, _) = get(k.addr(), "/api/v1/secrets");
        assert_eq!(code, 404);
        k.stop();
        assert!(std::net::TcpStream::connect(k.addr()).is_err());
        k.restart();
        let (code, body) = get(k.addr(), "/api/v1/nodes");
        assert_eq!(code, 200);
        assert!(body.contains("192.0.2.1"), "{body}");
    }
}
