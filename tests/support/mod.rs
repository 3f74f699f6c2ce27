//! Test harness: starts the real `warden` binary and talks to it over real
//! mTLS, the way a gateway would.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use warden::dev::{Ca, DemoKey};
use warden_client::signing::Signer;
use warden_client::{Client, Tls};

pub const BIN: &str = env!("CARGO_BIN_EXE_warden");

/// The deadline of the fixtures' clients: tests of what the server answers
/// (a paused node woken, a rolling restart) wait for the answer rather
/// than count a slow one as an error. The client's own deadline is tested
/// by the tests that set it.
pub const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A running `warden` process. Killed on drop.
pub struct Server {
    child: Option<Child>,
    pub addr: String,
    /// The plain-HTTP metrics and probe listener.
    pub metrics_addr: String,
    pub dir: PathBuf,
    stderr: Arc<Mutex<String>>,
    _tmp: Option<Arc<tempfile::TempDir>>,
}

impl Server {
    /// `warden serve --dev` in a fresh directory, on a free port.
    pub fn dev() -> Self {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let dir = tmp.path().join("warden-dev");
        let mut server = Self::dev_in(&dir);
        server._tmp = Some(tmp);
        server
    }

    /// `warden serve --dev` in a fresh directory, with `envs` set (e.g.
    /// `WARDEN_SERVING_THREADS`).
    pub fn dev_with_env(envs: &[(&str, &str)]) -> Self {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let dir = tmp.path().join("warden-dev");
        let mut command = Command::new(BIN);
        command.args(dev_args(&dir)).envs(envs.iter().copied());
        let mut server = Self::start_command(command, dir, "info");
        server._tmp = Some(tmp);
        server
    }

    /// `warden serve --dev` reusing (or creating) `dir`.
    pub fn dev_in(dir: &Path) -> Self {
        Self::start(&dev_args(dir), dir.to_owned(), "info")
    }

    /// `warden serve --config FILE`.
    pub fn with_config(config: &Path) -> Self {
        Self::with_config_logging(config, "info")
    }

    /// `warden serve --config FILE` with `envs` set (e.g.
    /// `WARDEN_SERVING_THREADS`).
    pub fn with_config_env(config: &Path, envs: &[(&str, &str)]) -> Self {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--config", config.to_str().unwrap()])
            .envs(envs.iter().copied());
        Self::start_command(command, config.parent().unwrap().to_owned(), "info")
    }

    /// `warden serve --config FILE` with `RUST_LOG` set to `log`.
    pub fn with_config_logging(config: &Path, log: &str) -> Self {
        let server = Self::with_config_unready(config, log);
        server.wait_past_fence();
        server
    }

    /// `warden serve --config FILE`, returning once it listens, before it
    /// is ready (to start several side by side).
    pub fn with_config_unready(config: &Path, log: &str) -> Self {
        let args = ["serve", "--config", config.to_str().unwrap()];
        let mut command = Command::new(BIN);
        command.args(args);
        Self::spawn(command, config.parent().unwrap().to_owned(), log)
    }

    /// As [`Self::with_config_unready`], with a wall clock of its own: the
    /// offset from the real time written in `clock` (`+20s`, `-3s`; read
    /// again every second), through libfaketime. The monotonic clock is
    /// left alone, as NTP leaves it. A machine whose NTP stopped, or was
    /// spoofed, is a node whose clock is off by this much.
    pub fn with_config_and_clock_unready(config: &Path, clock: &Path, faketime: &Path) -> Self {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--config", config.to_str().unwrap()])
            .envs(faketime_env(clock, faketime));
        Self::spawn(command, config.parent().unwrap().to_owned(), "info")
    }

    /// `warden serve --dev` reusing `dir`, with a wall clock of its own as
    /// in [`Self::with_config_and_clock_unready`], returning once it
    /// listens, before it is ready.
    pub fn dev_in_with_clock_unready(dir: &Path, clock: &Path, faketime: &Path) -> Self {
        let mut command = Command::new(BIN);
        command
            .args(dev_args(dir))
            .envs(faketime_env(clock, faketime));
        Self::spawn(command, dir.to_owned(), "info")
    }

    /// `warden serve --dev` reusing `dir`, with the disk of one of its
    /// files in `trouble` (see [`DiskTrouble`]).
    pub fn dev_in_with_disk_trouble(dir: &Path, trouble: &DiskTrouble, file: &str) -> Self {
        let mut command = Command::new(BIN);
        command.args(dev_args(dir)).envs(trouble.env(file));
        Self::start_command(command, dir.to_owned(), "info")
    }

    /// `warden serve --config FILE` under an open-file limit of `fds`.
    pub fn with_config_fd_limit(config: &Path, fds: u32) -> Self {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!("ulimit -n {fds} && exec \"$0\" \"$@\""),
            BIN,
            "serve",
            "--config",
            config.to_str().unwrap(),
        ]);
        Self::start_command(command, config.parent().unwrap().to_owned(), "info")
    }

    /// `warden serve --dev` reusing `dir`, under a file-size limit of
    /// about `bytes` (rounded up to the shell's blocks): a write past it
    /// fails partway, as on a full disk. SIGXFSZ is ignored, as a service
    /// manager's limit leaves the process to see the failed write. The
    /// limit is the soft one, so [`Self::lift_file_size_limit`] can make
    /// room again without privileges.
    pub fn dev_in_with_file_size_limit(dir: &Path, bytes: u64) -> Self {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!(
                "trap '' XFSZ && ulimit -S -f {} && exec \"$0\" \"$@\"",
                bytes.div_ceil(512)
            ),
            BIN,
        ]);
        command.args(dev_args(dir));
        Self::start_command(command, dir.to_owned(), "info")
    }

    fn start(args: &[&str], dir: PathBuf, log: &str) -> Self {
        let mut command = Command::new(BIN);
        command.args(args);
        Self::start_command(command, dir, log)
    }

    fn start_command(command: Command, dir: PathBuf, log: &str) -> Self {
        let server = Self::spawn(command, dir, log);
        server.wait_past_fence();
        server
    }

    fn spawn(mut command: Command, dir: PathBuf, log: &str) -> Self {
        // Metrics on a free port too, so tests can run side by side.
        let mut child = command
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("RUST_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start warden");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut metrics = String::new();
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let first_word =
                    |rest: &str| rest.split_whitespace().next().unwrap_or("").to_owned();
                if let Some(rest) = line.strip_prefix("metrics on ") {
                    metrics = first_word(rest);
                }
                if let Some(rest) = line.strip_prefix("listening on ") {
                    let _ = tx.send((first_word(rest), metrics.clone()));
                }
            }
        });
        let (addr, metrics_addr) = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                panic!("warden did not start; stderr:\n{}", stderr.lock().unwrap());
            }
        };
        Self {
            child: Some(child),
            addr,
            metrics_addr,
            dir,
            stderr,
            _tmp: None,
        }
    }

    /// Requests signed before the restart fence (the start second plus the
    /// future skew) are STALE; the server reports ready once it has passed.
    pub fn wait_past_fence(&self) {
        self.wait_past_fence_within(Duration::from_secs(30));
    }

    /// [`Self::wait_past_fence`], for a fence further off than a restart's
    /// usual few seconds (a future skew lowered since the last process).
    pub fn wait_past_fence_within(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.http_get("/readyz").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "warden never became ready; stderr:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn demo(&self) -> DemoKey {
        serde_json::from_slice(&std::fs::read(self.dir.join("demo-key.json")).unwrap()).unwrap()
    }

    pub fn signer(&self) -> Signer {
        let demo = self.demo();
        Signer::new(demo.key_id, demo.secret.into_bytes())
    }

    pub fn tls(&self) -> Tls {
        Tls::from_dev_dir(&self.dir).unwrap()
    }

    /// A client that waits for the server's answers (see
    /// [`ANSWER_WAIT`]).
    pub async fn client(&self) -> Client {
        Client::connect(&self.addr, self.tls())
            .await
            .expect("connect over mTLS")
            .with_timeout(ANSWER_WAIT)
    }

    /// GET a path on the metrics listener; returns (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(&self.metrics_addr)
            .expect("connect to the metrics listener");
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            tcp,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until the log contains `needle`; returns the log.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            assert!(
                Instant::now() < deadline,
                "the log never showed {needle:?}:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// Lifts the file-size limit of a server started under one: the
    /// disk has room again, and the process goes on as it is.
    pub fn lift_file_size_limit(&self) {
        let pid = self.pid();
        let out = Command::new("python3")
            .args([
                "-c",
                "import resource, sys; resource.prlimit(int(sys.argv[1]), resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))",
                &pid.to_string(),
            ])
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal by name ("HUP", "TERM", ...).
    /// `STOP` returns only once every thread has stopped: the signal only
    /// marks the process, and a thread busy on the other core could answer
    /// (or renew) once more after `kill` returns.
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("server is running");
        let pid = child.id();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        if name == "STOP" {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !all_threads_stopped(pid) {
                assert!(Instant::now() < deadline, "warden did not stop on SIGSTOP");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait_exit()
    }

    /// Waits (up to 20 s) for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server is running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "warden did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in
/// `/proc/PID/task/*/stat`, after the parenthesised command name).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for task in tasks.flatten() {
        // A thread that ended meanwhile has no stat to read.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        if !matches!(state.and_then(|r| r.chars().next()), Some('T' | 't')) {
            return false;
        }
        any = true;
    }
    any
}

/// The arguments of `warden serve --dev` in `dir`, on a free port.
pub fn dev_args(dir: &Path) -> [&str; 6] {
    [
        "serve",
        "--dev",
        "--dev-dir",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        // A test that failed shows what its servers said last: a failure
        // seen once in CI must explain itself, as it may never be seen
        // again. `tests/run` repeats these blocks in its summary.
        if std::thread::panicking() {
            let logs = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
            eprintln!("{}", failed_test_log(&logs));
        }
    }
}

/// The last lines of a server's log, between markers `tests/run` looks
/// for, each line cut short.
fn failed_test_log(logs: &str) -> String {
    const LINES: usize = 25;
    const WIDTH: usize = 400;
    let lines: Vec<&str> = logs.lines().collect();
    let mut out = String::from("== warden log of a failed test (last lines)\n");
    for line in &lines[lines.len().saturating_sub(LINES)..] {
        let cut = line
            .char_indices()
            .nth(WIDTH)
            .map_or(line.len(), |(i, _)| i);
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out.push_str("== end of warden log");
    out
}

/// A directory with a CA, server and client certificates for config-mode
/// servers, and a config file written by the test.
pub struct ConfigDir {
    pub tmp: tempfile::TempDir,
    pub ca: Ca,
}

impl ConfigDir {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::new("test CA").unwrap();
        let (server, server_key) = ca.server_cert(&["localhost", "127.0.0.1"]).unwrap();
        let (client, client_key) = ca
            .client_cert("test-client", &["spiffe://test/gateway"])
            .unwrap();
        let write = |name: &str, text: &str| std::fs::write(tmp.path().join(name), text).unwrap();
        write("ca.pem", &ca.cert_pem());
        write("server.pem", &server);
        write("server-key.pem", &server_key);
        write("client.pem", &client);
        write("client-key.pem", &client_key);
        Self { tmp, ca }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Writes `warden.toml` with the TLS section, a free port, and `rest`.
    /// Unless `rest` has its own `[[callers]]`, the test client
    /// (`spiffe://test/gateway`) may check and forward identities.
    pub fn write_config(&self, rest: &str) -> PathBuf {
        self.write_config_with(rest, "")
    }

    /// Like [`Self::write_config`], with extra lines for the `[tls]` table.
    pub fn write_config_with(&self, rest: &str, tls_extra: &str) -> PathBuf {
        let callers = if rest.contains("[[callers]]") {
            ""
        } else {
            "[[callers]]\nidentity = \"spiffe://test/gateway\"\nroles = [\"check\", \"forward-identity\"]\n\n"
        };
        let text = format!(
            "listen = \"127.0.0.1:0\"\n\n{callers}{rest}\n\n[tls]\ncert = \"server.pem\"\nkey = \"server-key.pem\"\nclient_ca = \"ca.pem\"\nreload_interval = \"200ms\"\n{tls_extra}"
        );
        let path = self.path().join("warden.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn start(&self, rest: &str) -> Server {
        Server::with_config(&self.write_config(rest))
    }

    /// Writes a fresh master key to `master.key`, for `[store]` configs.
    pub fn write_master_key(&self) {
        std::fs::write(
            self.path().join("master.key"),
            warden::crypto::MasterKey::generate_hex(),
        )
        .unwrap();
    }

    /// Runs the `warden` CLI against `server` with this directory's client
    /// certificate.
    pub fn cli(&self, server: &Server, args: &[&str]) -> std::process::Output {
        self.cli_command(server, args).output().expect("run warden")
    }

    /// Like [`Self::cli`], failing the test (and killing the CLI) if it
    /// has not ended within `limit`.
    pub fn cli_within(
        &self,
        server: &Server,
        args: &[&str],
        limit: std::time::Duration,
    ) -> std::process::Output {
        output_within(&mut self.cli_command(server, args), limit)
    }

    fn cli_command(&self, server: &Server, args: &[&str]) -> Command {
        let p = |name: &str| self.path().join(name).to_str().unwrap().to_owned();
        let mut command = Command::new(BIN);
        command.args(args).args([
            "--target",
            &server.addr,
            "--ca",
            &p("ca.pem"),
            "--cert",
            &p("client.pem"),
            "--key",
            &p("client-key.pem"),
        ]);
        command
    }

    /// Issues a client certificate from this directory's CA into
    /// `NAME.pem` / `NAME-key.pem` and returns TLS settings that use it.
    pub fn client_tls(&self, name: &str, cn: &str, sans: &[&str]) -> Tls {
        let (cert, key) = self.ca.client_cert(cn, sans).unwrap();
        std::fs::write(self.path().join(format!("{name}.pem")), &cert).unwrap();
        std::fs::write(self.path().join(format!("{name}-key.pem")), &key).unwrap();
        Tls::from_pem(
            self.ca.cert_pem().into_bytes(),
            cert.into_bytes(),
            key.into_bytes(),
        )
    }

    /// A client that waits for the server's answers (see
    /// [`ANSWER_WAIT`]).
    pub async fn client(&self, server: &Server) -> Client {
        Client::connect(&server.addr, Tls::from_dev_dir(self.path()).unwrap())
            .await
            .expect("connect over mTLS")
            .with_timeout(ANSWER_WAIT)
    }
}

/// A free TCP port on loopback for a listener a test must name before it
/// starts (a cluster node's advertised address, nginx, forward auth).
///
/// Not `bind(0)`-and-release: the kernel hands the released port out again
/// as an ephemeral port (to warden's own `127.0.0.1:0` listeners, to any
/// outgoing connection, or to the next `bind(0)`), and a test then fails
/// with "Address already in use" (CI did, once). So ports come from below
/// the kernel's ephemeral range, where it never allocates by itself, each
/// handed out once per test process, starting at an offset taken from the
/// process id so a test run right after another does not reuse its recent
/// ports; a port someone holds is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let span = 8192.min(ephemeral_low.saturating_sub(10_000));
    if span < 1024 {
        // An unusual range leaves no room below it: fall back to the kernel.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let base = ephemeral_low - span;
    let offset = std::process::id() * 613;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (base + (offset + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {base}..{ephemeral_low}");
}

/// Config files for the cluster nodes `nodes` in `dir`: one database and
/// master key, each node its own store directory and port, a lease of
/// `ttl`, and the peer certificate `node.pem` (identity
/// `spiffe://test/node`, role `peer`). The test client may check, forward
/// identities and administer. `extra` is appended (policies, keys).
pub fn cluster_configs(
    dir: &ConfigDir,
    url: &str,
    nodes: &[&str],
    ttl: &str,
    extra: &str,
) -> Vec<PathBuf> {
    dir.write_master_key();
    dir.client_tls("node", "node", &["spiffe://test/node"]);
    nodes
        .iter()
        .map(|node| {
            let port = free_port();
            let rest = format!(
                "[[callers]]\nidentity = \"spiffe://test/gateway\"\nroles = [\"check\", \"admin\", \"forward-identity\"]\n\n\
                 [[callers]]\nidentity = \"spiffe://test/node\"\nroles = [\"peer\"]\n\n\
                 [store]\ndir = \"{node}\"\nmaster_key_file = \"master.key\"\npostgres_url = \"{url}\"\n\n\
                 [cluster]\nnode = \"{node}\"\nadvertise = \"127.0.0.1:{port}\"\nlease_ttl = \"{ttl}\"\ncert = \"node.pem\"\nkey = \"node-key.pem\"\n\n\
                 {extra}\n"
            );
            let text = std::fs::read_to_string(dir.write_config(&rest))
                .unwrap()
                .replace(
                    "listen = \"127.0.0.1:0\"",
                    &format!("listen = \"127.0.0.1:{port}\""),
                );
            let path = dir.path().join(format!("{node}.toml"));
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect()
}

/// Runs `command` to its end, failing the test (and killing it) if it has
/// not ended within `limit`: a process that should refuse to run must not
/// hang the suite when it runs instead.
pub fn output_within(command: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run warden");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{command:?} did not end within {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `warden serve --config CONFIG`, which must refuse to start (and end
/// within 30 s): what it wrote to standard error, to say why.
pub fn refused_start(config: &Path) -> String {
    let out = output_within(
        Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(["--metrics-listen", "127.0.0.1:0"]),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "warden started: {stderr}");
    stderr
}

/// Writes a libfaketime clock file `ahead_secs` ahead of the real time, in
/// one step (a new file renamed over the old): a process reading it in
/// between would otherwise find it empty, and take the real time.
pub fn write_clock(clock: &Path, ahead_secs: i64) {
    use std::os::unix::fs::PermissionsExt;
    let next = clock.with_extension("next");
    std::fs::write(&next, format!("{ahead_secs:+}s\n")).unwrap();
    // Readable by PostgreSQL's own user, whatever the umask.
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&next, clock).unwrap();
}

/// Removes what libfaketime left in /dev/shm for processes that are gone.
///
/// Each process under libfaketime makes a semaphore and a shared memory
/// object named after its pid, and removes them on a normal exit; one
/// killed leaves them behind. A later process given that pid, under
/// another user (PostgreSQL's processes run as `postgres`), can open
/// neither its own nor its parent's, and libfaketime exits: the database
/// of a clock test then fails to start. Seen once, on a machine holding
/// 312 such leftovers.
fn sweep_faketime_leftovers() {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for entry in entries.map_while(Result::ok) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let pid = name
            .strip_prefix("sem.faketime_sem_")
            .or_else(|| name.strip_prefix("faketime_shm_"));
        if let Some(pid) = pid.filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The environment that gives a process the wall clock in `clock` through
/// libfaketime (read again every second; the monotonic clock untouched).
fn faketime_env<'a>(
    clock: &'a Path,
    faketime: &'a Path,
) -> [(&'static str, &'a std::ffi::OsStr); 5] {
    sweep_faketime_leftovers();
    [
        ("LD_PRELOAD", faketime.as_os_str()),
        ("FAKETIME_TIMESTAMP_FILE", clock.as_os_str()),
        ("FAKETIME_CACHE_DURATION", "1".as_ref()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".as_ref()),
        ("NO_FAKE_STAT", "1".as_ref()),
    ]
}

/// libfaketime, to give a node a wall clock of its own; `None` (the test
/// is skipped) where it is not installed, except in CI (`bash tests/run`
/// installs it).
pub fn libfaketime() -> Option<PathBuf> {
    let found = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "libfaketime must be installed in CI (bash tests/run installs it)"
        );
        eprintln!("skipped: libfaketime is not installed");
    }
    found
}

/// A secret of the right length for config files.
pub const SECRET: &str = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz";

/// A fresh database on the test server, or `None` when there is none.
pub async fn fresh_database() -> Option<String> {
    let Ok(base) = std::env::var("WARDEN_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var("CI").is_err(),
            "WARDEN_TEST_POSTGRES_URL must be set in CI (bash tests/run starts PostgreSQL)"
        );
        eprintln!("skipped: WARDEN_TEST_POSTGRES_URL is not set; run bash tests/run");
        return None;
    };
    let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .expect("connect to the test PostgreSQL");
    tokio::spawn(conn);
    let name = format!(
        "warden_test_{}",
        hex::encode(warden::crypto::random_bytes::<6>())
    );
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    Some(format!("{prefix}/{name}"))
}

/// Every membership version the cluster on `url` logged, oldest first,
/// with its members' names.
pub async fn membership_log(url: &str) -> Vec<(i64, Vec<String>)> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .query(
            "SELECT version, members FROM warden_membership_log ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let members: Vec<(String, String, i64)> = serde_json::from_str(r.get(1)).unwrap();
            (r.get(0), members.into_iter().map(|m| m.0).collect())
        })
        .collect()
}

/// Sends `requests` down one `CheckStream`; every answer, in order.
pub async fn stream_all(
    client: &mut Client,
    requests: Vec<warden_client::proto::CheckRequest>,
) -> Vec<Result<warden_client::proto::CheckResponse, tonic::Status>> {
    use futures::StreamExt;
    client
        .stub()
        .check_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await
}

/// A `CheckStream` fed from a channel holding up to `buffer` requests: the
/// sender to feed it and the answers, for tests that pace a stream.
pub async fn open_stream(
    client: &mut Client,
    buffer: usize,
) -> (
    tokio::sync::mpsc::Sender<warden_client::proto::CheckRequest>,
    tonic::Streaming<warden_client::proto::CheckResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(buffer);
    let answers = client
        .stub()
        .check_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("open a CheckStream")
        .into_inner();
    (tx, answers)
}

/// A PostgreSQL of one test's own, so it can be stopped or restarted.
pub struct OwnPostgres {
    pub url: String,
    dir: String,
    /// With a clock of its own: the file holding its offset, in a
    /// directory the `postgres` user can read.
    clock: Option<(tempfile::TempDir, PathBuf)>,
}

impl OwnPostgres {
    pub fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// As [`Self::start`], with a wall clock of its own through libfaketime,
    /// as for a node ([`Server::with_config_and_clock_unready`]): the real
    /// time until [`Self::set_clock`] moves it. `None` (the test is
    /// skipped) without libfaketime.
    pub fn start_with_clock() -> Option<Self> {
        use std::os::unix::fs::PermissionsExt;
        let faketime = libfaketime()?;
        let dir = tempfile::tempdir().unwrap();
        let clock = dir.path().join("clock");
        std::fs::write(&clock, "+0\n").unwrap();
        for (path, mode) in [(dir.path(), 0o755), (clock.as_path(), 0o644)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        // Read again at every call, not every second: PostgreSQL is many
        // processes, each with its own libfaketime, and a real clock steps
        // for all of them at once. (Read every second, they disagreed for
        // up to a second after each step, and an older warden's sweep
        // removed live leases it saw by a clock not yet stepped.)
        let mut env = faketime_env(&clock, &faketime);
        env[2] = ("FAKETIME_CACHE_DURATION", "0".as_ref());
        let mut pg = Self::start_with(&env)?;
        pg.clock = Some((dir, clock));
        Some(pg)
    }

    /// Sets its wall clock `ahead_secs` ahead of the real time, for all its
    /// processes at once.
    pub fn set_clock(&self, ahead_secs: i64) {
        let (_, clock) = self
            .clock
            .as_ref()
            .expect("started with a clock of its own");
        write_clock(clock, ahead_secs);
    }

    /// As [`Self::start`], with TLS on: `cert` and `key` (PEM) are its
    /// certificate and key.
    pub fn start_with_tls(cert: &str, key: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_file, cert).unwrap();
        std::fs::write(&key_file, key).unwrap();
        Self::start_with(&[
            ("WARDEN_PG_TLS_CERT", cert_file.as_os_str()),
            ("WARDEN_PG_TLS_KEY", key_file.as_os_str()),
        ])
    }

    fn start_with(env: &[(&str, &std::ffi::OsStr)]) -> Option<Self> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/postgres-up.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .envs(env.iter().copied())
            .output()
            .ok()?;
        if !out.status.success() {
            assert!(
                std::env::var("CI").is_err(),
                "tests/postgres-up.sh failed in CI: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("skipped: cannot start a PostgreSQL of this test's own");
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .map(str::to_owned)
        };
        Some(Self {
            url: value("WARDEN_TEST_POSTGRES_URL")?,
            dir: value("WARDEN_TEST_POSTGRES_DIR")?,
            clock: None,
        })
    }

    /// Stops it for good (its data goes).
    pub fn stop(&self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/postgres-up.sh");
        std::process::Command::new("bash")
            .args([script, "stop", &self.dir])
            .status()
            .unwrap();
    }

    /// Restarts it on the same data and port, as a maintenance restart
    /// or a failover does: every connection to it is closed.
    pub fn restart(&self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/postgres-up.sh");
        let status = std::process::Command::new("bash")
            .args([script, "restart", &self.dir])
            .status()
            .unwrap();
        assert!(status.success(), "PostgreSQL did not restart");
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Up to `count` TCP connections to `addr` that never say a word, made
/// until the test's own descriptors run out or the server takes no more.
pub async fn idle_connections(
    addr: std::net::SocketAddr,
    count: usize,
) -> Vec<tokio::net::TcpStream> {
    let mut flood = Vec::new();
    let mut unanswered = 0;
    for _ in 0..count {
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            break;
        };
        // A SYN dropped while the listen backlog is full is sent again
        // after a second: only a run of connects that time out means the
        // server is taking no more.
        match tokio::time::timeout(Duration::from_secs(3), socket.connect(addr)).await {
            Ok(Ok(stream)) => {
                flood.push(stream);
                unanswered = 0;
            }
            _ if unanswered < 2 => unanswered += 1,
            _ => break,
        }
    }
    flood
}

/// A rustls client configuration from a directory's `ca.pem`,
/// `client.pem` and `client-key.pem`, offering only `versions`: for tests
/// that speak TLS themselves, below any gRPC client.
pub fn client_tls_config(
    dir: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut read("ca.pem").as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain = rustls_pemfile::certs(&mut read("client.pem").as_slice())
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pemfile::private_key(&mut read("client-key.pem").as_slice())
        .unwrap()
        .unwrap();
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap()
}

/// A TCP proxy (to PostgreSQL, say) that can be cut (the listener and
/// every open connection closed), frozen (connections stay open and
/// nothing passes until it is thawed, as with a peer that hangs), or made
/// to strand the connections open now: they stay open and carry nothing
/// ever again, while new ones pass, as with a database host gone without a
/// word and a failover to another.
pub struct Proxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
    state: tokio::sync::watch::Sender<Passing>,
    opened: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Which of a [`Proxy`]'s connections carry bytes.
#[derive(Clone, Copy, Default)]
struct Passing {
    frozen: bool,
    /// Connections numbered below this carry nothing.
    stranded_below: u64,
}

impl Passing {
    fn holds(&self, connection: u64) -> bool {
        self.frozen || connection < self.stranded_below
    }
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (state, watch) = tokio::sync::watch::channel(Passing::default());
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = opened.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let number = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (upstream, watch) = (upstream.clone(), watch.clone());
                conns.spawn(async move {
                    let Ok(out) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let ((in_read, in_write), (out_read, out_write)) =
                        (inbound.into_split(), out.into_split());
                    tokio::join!(
                        pump(in_read, out_write, number, watch.clone()),
                        pump(out_read, in_write, number, watch)
                    );
                });
            }
        });
        Self {
            port,
            task,
            state,
            opened,
        }
    }

    /// A proxy to the database of `url` (`postgres://postgres@HOST:PORT/DB`,
    /// as [`fresh_database`] gives), and the same URL through the proxy.
    pub async fn to_database(url: &str) -> (Self, String) {
        let (hostport, database) = url
            .strip_prefix("postgres://postgres@")
            .and_then(|rest| rest.split_once('/'))
            .expect("a postgres://postgres@HOST:PORT/DB URL");
        let proxy = Self::start(hostport.to_owned()).await;
        let through = format!("postgres://postgres@127.0.0.1:{}/{database}", proxy.port);
        (proxy, through)
    }

    /// Closes the listener and every connection through it.
    pub fn cut(&self) {
        self.task.abort();
    }

    /// Nothing passes, either way, until [`Self::thaw`].
    pub fn freeze(&self) {
        self.state.send_modify(|s| s.frozen = true);
    }

    pub fn thaw(&self) {
        self.state.send_modify(|s| s.frozen = false);
    }

    /// The connections open now carry nothing from now on; later ones do.
    pub fn strand(&self) {
        let below = self.opened.load(std::sync::atomic::Ordering::SeqCst);
        self.state.send_modify(|s| s.stranded_below = below);
    }
}

/// Copies `from` to `to` for connection `number`, holding what it has
/// while the proxy holds that connection.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    number: u64,
    mut state: tokio::sync::watch::Receiver<Passing>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if state.wait_for(|s| !s.holds(number)).await.is_err() {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = state.wait_for(|s| s.holds(number)) => continue,
        };
        if state.wait_for(|s| !s.holds(number)).await.is_err()
            || to.write_all(&buf[..n]).await.is_err()
        {
            return;
        }
    }
}

/// A disk that fails or hangs for one file of a warden process, when the
/// test says: `tests/fixtures/disk_trouble.c`, built here with the system's
/// C compiler (the one Rust links with) and preloaded into the process.
/// Writes (`pwrite64`) and syncs of that file fail with EIO, or hang until
/// told otherwise; nothing else of the process is touched.
pub struct DiskTrouble {
    dir: tempfile::TempDir,
}

impl DiskTrouble {
    pub fn build() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/disk_trouble.c");
        let out = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(dir.path().join("disk_trouble.so"))
            .arg(&source)
            .arg("-ldl")
            .output()
            .expect("a C compiler (cc) to build tests/fixtures/disk_trouble.c");
        assert!(
            out.status.success(),
            "cc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let trouble = Self { dir };
        trouble.heal();
        trouble
    }

    /// The environment preloading it, for the file whose path ends with
    /// `file`.
    fn env(&self, file: &str) -> Vec<(&'static str, std::ffi::OsString)> {
        vec![
            ("LD_PRELOAD", self.dir.path().join("disk_trouble.so").into()),
            ("WARDEN_TEST_TROUBLE_FILE", file.into()),
            ("WARDEN_TEST_TROUBLE_CONTROL", self.control().into()),
        ]
    }

    fn control(&self) -> PathBuf {
        self.dir.path().join("control")
    }

    /// Writes to the file fail with EIO from now on (a hung one ends so).
    pub fn fail(&self) {
        std::fs::write(self.control(), "fail").unwrap();
    }

    /// Writes to the file hang from now on, until told otherwise.
    pub fn hang(&self) {
        std::fs::write(self.control(), "hang").unwrap();
    }

    /// The disk works again (a hung write goes through).
    pub fn heal(&self) {
        std::fs::write(self.control(), "works").unwrap();
    }
}

/// The README's fenced block in `lang` that opens with the line(s)
/// `opening`, from there to the closing fence: the tests run the
/// configurations the README gives, not copies of them that could drift
/// apart.
pub fn readme_block(lang: &str, opening: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let fence = format!("```{lang}\n");
    let start = readme
        .find(&format!("{fence}{opening}\n"))
        .unwrap_or_else(|| panic!("README has no {lang} block opening with {opening:?}"))
        + fence.len();
    let len = readme[start..].find("```").unwrap();
    readme[start..start + len].to_owned()
}

/// `text` with `from` replaced by `to`, which must be in it: a test that
/// adapts a README configuration fails when the README changes under it.
pub fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in:\n{text}");
    text.replace(from, to)
}

/// The value of one metric line (`name` with its labels, as exported) on
/// `server`'s metrics listener; 0 if absent.
/// `warden_serving_thread_connections` of each of `threads` serving
/// threads: the connections open on each.
pub fn per_serving_thread(server: &Server, threads: usize) -> Vec<u64> {
    (0..threads)
        .map(|t| {
            metric(
                server,
                &format!("warden_serving_thread_connections{{thread=\"{t}\"}}"),
            )
        })
        .collect()
}

pub fn metric(server: &Server, name: &str) -> u64 {
    let (_, body) = server.http_get("/metrics");
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map_or(0, |v| v as u64)
}

/// Sends pre-encoded messages and decodes the answers as `T`, so a test can
/// put bytes on the wire that no well-behaved client would (e.g. invalid
/// UTF-8 in a string field).
pub struct RawCodec<T>(std::marker::PhantomData<T>);

impl<T> Default for RawCodec<T> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

pub struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl<T: prost::Message + Default + Send + 'static> tonic::codec::Codec for RawCodec<T> {
    type Encode = Vec<u8>;
    type Decode = T;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<T>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(tonic::codec::BufferSettings::default())
    }
}
