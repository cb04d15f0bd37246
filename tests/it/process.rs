//! The `kabar` binary as a child process, for what only the process shows: its exit code, its
//! log on stderr, its signals and its environment. Each child gets a clean environment (plus
//! `PATH`), its own working directory and free ports, unless the test sets them.

use std::{
    collections::BTreeMap,
    io::BufRead,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A fresh empty directory for one child's working directory.
pub fn work_dir(name: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kabar-proc-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir is writable");
    dir
}

/// A running `kabar serve`.
pub struct Kabar {
    child: Child,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    exit: Option<ExitStatus>,
    /// A working directory made for this child alone, removed with it.
    own_dir: Option<PathBuf>,
}

impl Kabar {
    /// `kabar serve` in a fresh working directory with `vars`, on free ports unless `vars` sets
    /// `KABAR_GRPC_ADDR` or `KABAR_HTTP_ADDR`.
    pub fn serve(vars: &[(&str, &str)]) -> Kabar {
        Kabar::serve_limited(vars, None)
    }

    /// [`Kabar::serve`] under an open files limit (`ulimit -n`), when given.
    pub fn serve_limited(vars: &[(&str, &str)], open_files: Option<u32>) -> Kabar {
        let dir = work_dir("serve");
        let mut kabar = Kabar::spawn_limited(&dir, Kabar::env_with_ports(vars), open_files);
        kabar.own_dir = Some(dir);
        kabar
    }

    fn env_with_ports(vars: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert(
            "KABAR_GRPC_ADDR".into(),
            format!("127.0.0.1:{}", free_port()),
        );
        env.insert(
            "KABAR_HTTP_ADDR".into(),
            format!("127.0.0.1:{}", free_port()),
        );
        for (k, v) in crate::support::PACING_OUT_OF_THE_WAY {
            env.insert(k.to_owned(), v.to_owned());
        }
        for (k, v) in vars {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        env
    }

    /// `kabar serve` in `dir` with exactly `env` (plus `PATH`): a test of `.env` leaves the
    /// addresses to the file.
    pub fn spawn(dir: &Path, env: BTreeMap<String, String>) -> Kabar {
        Kabar::spawn_limited(dir, env, None)
    }

    fn spawn_limited(dir: &Path, env: BTreeMap<String, String>, open_files: Option<u32>) -> Kabar {
        let addr = |name: &str| {
            env.get(name)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
        };
        let (grpc_addr, http_addr) = (addr("KABAR_GRPC_ADDR"), addr("KABAR_HTTP_ADDR"));
        let binary = env!("CARGO_BIN_EXE_kabar");
        let mut command = match open_files {
            // The shell lowers the limit, then becomes kabar (same process id).
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" serve"))
                    .arg(binary);
                c
            }
            None => {
                let mut c = Command::new(binary);
                c.arg("serve");
                c
            }
        };
        let mut child = command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&env)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the kabar binary starts");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().expect("stderr is piped");
        let lines = stderr.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                match line {
                    Ok(line) => lines.lock().unwrap().push(line),
                    Err(_) => break,
                }
            }
        });
        Kabar {
            child,
            grpc_addr,
            http_addr,
            stderr,
            reader: Some(reader),
            exit: None,
            own_dir: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of `/proc/PID/status` in KiB, such as `VmRSS:` (resident now) or `VmHWM:` (peak).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("kabar is running");
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .expect("field present")
    }

    /// The stderr lines written so far (all of them once the process has exited).
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// The stderr lines parsed as JSON objects (with `KABAR_LOG_FORMAT=json`).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stderr()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
            .collect()
    }

    /// Waits until a stderr line contains `text`.
    pub async fn wait_for_line(&self, text: &str, within: Duration) -> bool {
        crate::support::eventually(within, || async {
            self.stderr().iter().any(|l| l.contains(text))
        })
        .await
    }

    /// A channel to the gRPC port, once it accepts connections.
    pub async fn channel(&mut self, within: Duration) -> Channel {
        let deadline = Instant::now() + within;
        loop {
            let endpoint = Channel::from_shared(format!("http://{}", self.grpc_addr)).unwrap();
            match endpoint.connect().await {
                Ok(channel) => return channel,
                Err(e) => {
                    if let Some(status) = self.child.try_wait().expect("try_wait") {
                        panic!("kabar exited with {status}:\n{}", self.stderr().join("\n"));
                    }
                    if Instant::now() >= deadline {
                        panic!("kabar did not listen on {}: {e}", self.grpc_addr);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// The health status of `service` ("" for the whole server), as an i32 of `ServingStatus`.
    pub async fn health_status(&self, channel: &Channel, service: &str) -> Option<i32> {
        HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .ok()
            .map(|r| r.into_inner().status)
    }

    /// Connects and waits until the whole server reports SERVING; the channel.
    pub async fn wait_serving(&mut self) -> Channel {
        let channel = self.channel(Duration::from_secs(15)).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.health_status(&channel, "").await != Some(crate::support::SERVING) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("kabar exited with {status}:\n{}", self.stderr().join("\n"));
            }
            assert!(Instant::now() < deadline, "kabar did not report SERVING");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        channel
    }

    /// Sends SIGTERM, as Kubernetes and systemd do.
    pub fn terminate(&self) {
        let killed = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("the kill command runs");
        assert!(killed.success(), "kill -TERM failed");
    }

    /// SIGKILL: the process dies at once, with no chance to finish or give anything back.
    pub async fn kill(&mut self) {
        let _ = self.child.kill();
        self.wait_exit(Duration::from_secs(5)).await;
    }

    /// Waits for the process to exit; its status, or `None` if it still runs after `within`.
    /// Once it has exited, every stderr line has been collected.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        if self.exit.is_some() {
            return self.exit;
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                if let Some(reader) = self.reader.take() {
                    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
                }
                self.exit = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then the exit status within `within` (panics if it does not exit).
    pub async fn stop(&mut self, within: Duration) -> ExitStatus {
        self.terminate();
        self.wait_exit(within)
            .await
            .unwrap_or_else(|| panic!("kabar did not exit within {within:?}"))
    }
}

impl Drop for Kabar {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(dir) = self.own_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
