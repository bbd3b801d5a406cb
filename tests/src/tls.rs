//! Real TLS stacks between simulated pods: `openssl s_server` in one pod,
//! `openssl s_client` in another, with a throwaway CA and SVID-like
//! certificates (EC P-256, SPIFFE URI SANs) made by the `openssl` CLI. Used
//! by the mTLS tests and the demo; the agent under test sees only the bytes.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::simnode::PodProcess;
use crate::{Pod, SimError};

/// A CA and leaf certificates, one per name, in a directory.
pub struct TlsMaterial {
    pub dir: PathBuf,
}

fn openssl(args: &[&str]) -> Result<(), SimError> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .map_err(|e| SimError::Io {
            what: "run openssl (install it: `cargo xtask setup`)".into(),
            source: e,
        })?;
    if !out.status.success() {
        return Err(SimError::Other(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

impl TlsMaterial {
    /// Makes a CA in `dir` and, for each (name, SPIFFE ID), a leaf whose
    /// URI SAN is that ID, usable for client and server authentication.
    pub fn generate(dir: &Path, leaves: &[(&str, &str)]) -> Result<Self, SimError> {
        std::fs::create_dir_all(dir).map_err(|e| SimError::Io {
            what: format!("create {}", dir.display()),
            source: e,
        })?;
        let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.pem"),
            "-subj",
            "/O=demo.local/CN=test CA",
            "-days",
            "2",
        ])?;
        for (name, spiffe) in leaves {
            let ext = format!(
                "subjectAltName=URI:{spiffe}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
            );
            std::fs::write(dir.join(format!("{name}.ext")), ext).map_err(|e| SimError::Io {
                what: "write extension file".into(),
                source: e,
            })?;
            openssl(&[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &p(&format!("{name}.key")),
                "-out",
                &p(&format!("{name}.csr")),
                "-subj",
                &format!("/O=demo.local/CN={name}"),
            ])?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &p(&format!("{name}.csr")),
                "-CA",
                &p("ca.pem"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &p(&format!("{name}.ext")),
                "-out",
                &p(&format!("{name}.pem")),
            ])?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn cert(&self, name: &str) -> String {
        self.dir
            .join(format!("{name}.pem"))
            .to_string_lossy()
            .into_owned()
    }

    pub fn key(&self, name: &str) -> String {
        self.dir
            .join(format!("{name}.key"))
            .to_string_lossy()
            .into_owned()
    }

    pub fn ca(&self) -> String {
        self.dir.join("ca.pem").to_string_lossy().into_owned()
    }

    /// The flowaudit TLS flags of a client with `who`'s certificate that
    /// accepts only `server_id` at the other end.
    pub fn client_flags(&self, who: &str, server_id: &str) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert(who),
            "--tls-key".into(),
            self.key(who),
            "--tls-ca".into(),
            self.ca(),
            "--allow-peer".into(),
            server_id.into(),
        ]
    }
}

/// TLS protocol version to force on both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Tls12,
    Tls13,
}

impl Version {
    fn flag(self) -> &'static str {
        match self {
            Version::Tls12 => "-tls1_2",
            Version::Tls13 => "-tls1_3",
        }
    }
}

fn host_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// What the server asks of the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No CertificateRequest.
    None,
    /// CertificateRequest; a client without a certificate may go on.
    Optional,
    /// CertificateRequest; a client without one is refused.
    Required,
}

/// Starts `openssl s_server` in `pod` on `ip:port` (s_server makes a `[::]`
/// socket IPv6-only, hence one address)
/// for `accepts` connections (None: until stopped); returns when it listens. It echoes lines
/// reversed (`-rev`), so every client gets an answer.
// Each argument is one axis of the handshake matrix the tests walk.
#[allow(clippy::too_many_arguments)]
pub fn server(
    pod: &Pod,
    material: &TlsMaterial,
    cert: &str,
    ip: IpAddr,
    port: u16,
    version: Version,
    auth: ClientAuth,
    accepts: Option<u32>,
) -> Result<PodProcess, SimError> {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_server", "-accept", &host_port(ip, port)]);
    if let Some(n) = accepts {
        cmd.arg("-naccept").arg(n.to_string());
    }
    cmd.args([
        "-rev",
        "-cert",
        &material.cert(cert),
        "-key",
        &material.key(cert),
    ])
    .args([
        "-CAfile",
        &material.ca(),
        "-alpn",
        "h2,http/1.1",
        version.flag(),
    ]);
    match auth {
        ClientAuth::None => {}
        ClientAuth::Optional => {
            cmd.args(["-verify", "1"]);
        }
        ClientAuth::Required => {
            cmd.args(["-Verify", "1"]);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut proc = pod.spawn_guarded(cmd)?;
    let stdout = proc
        .child_mut()
        .stdout
        .take()
        .ok_or_else(|| SimError::Other("s_server has no stdout".into()))?;
    // s_server prints "ACCEPT" once it listens.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ready = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("ACCEPT")
                && let Some(tx) = ready.take()
            {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
        SimError::Other(format!(
            "openssl s_server on port {port} did not start listening in 10 s"
        ))
    })?;
    Ok(proc)
}

/// Runs `openssl s_client` in `pod` against `ip:port`, sends one line and
/// closes; `cert` is the client certificate to offer, if any. Returns
/// whether the handshake completed (s_client's exit status) and its output.
pub fn client(
    pod: &Pod,
    material: &TlsMaterial,
    ip: IpAddr,
    port: u16,
    version: Version,
    cert: Option<&str>,
) -> Result<(bool, String), SimError> {
    let target = host_port(ip, port);
    let mut s_client = format!(
        "openssl s_client -connect {target} -servername backend.demo.local -alpn h2,http/1.1 -CAfile {} -quiet -no_ign_eof {}",
        material.ca(),
        version.flag()
    );
    if let Some(c) = cert {
        s_client.push_str(&format!(
            " -cert {} -key {}",
            material.cert(c),
            material.key(c)
        ));
    }
    let script = format!("{{ echo hello; sleep 0.5; }} | timeout 10 {s_client}");
    let start = Instant::now();
    let out = pod.output({
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    })?;
    let text = format!(
        "{}{} ({} ms)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        start.elapsed().as_millis()
    );
    Ok((out.status.success(), text))
}

/// Runs a Python one-shot client in `pod`: connects to `ip:port`, sends
/// `payload`, closes its sending side (simpod answers after EOF) and reads
/// the answer until the server closes or 2 s pass.
pub fn raw_client(pod: &Pod, ip: IpAddr, port: u16, payload: &[u8]) -> Result<bool, SimError> {
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    let script = format!(
        "import socket\ns=socket.create_connection(('{ip}',{port}),timeout=2)\ns.sendall(bytes.fromhex('{hex}'))\ns.shutdown(socket.SHUT_WR)\ntry:\n  s.recv(4096)\nexcept Exception:\n  pass\ns.close()\n"
    );
    let out = pod.output({
        let mut c = Command::new("python3");
        c.args(["-c", &script]);
        c
    })?;
    Ok(out.status.success())
}
