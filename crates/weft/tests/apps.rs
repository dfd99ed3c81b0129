//! The demo apps of Istio's tasks (`weft demo httpbin|sleep|tcp-echo|helloworld`) and
//! `weft load`, each as a real process on a port it picks, driven over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// A running `weft demo APP 0 --address 127.0.0.1 ...`, its stdout collected.
struct App {
    child: Child,
    addr: SocketAddr,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl App {
    fn start(args: &[&str], env: &[(&str, &str)]) -> App {
        let mut child = Command::new(WEFT)
            .args(["demo"])
            .args(args)
            .envs(env.iter().copied())
            .env("WEFT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let addr = first.rsplit("listening on ").next().unwrap().trim().parse().unwrap_or_else(|_| panic!("{first}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let sink = stdout.clone();
        std::thread::spawn(move || collect(lines, sink));
        App { child, addr, stdout }
    }

    fn get(&self, path: &str, headers: &[&str]) -> (u16, String) {
        curl(&self.addr.to_string(), path, headers, &[])
    }

    /// Waits (up to 30 s) for a stdout line containing `needle`.
    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.stdout.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "no log line with {needle:?}: {:?}", self.stdout.lock().unwrap());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn collect(lines: std::io::Lines<BufReader<ChildStdout>>, sink: Arc<Mutex<Vec<String>>>) {
    for l in lines.map_while(Result::ok) {
        println!("app | {l}");
        sink.lock().unwrap().push(l);
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl: (status, body).
fn curl(addr: &str, path: &str, headers: &[&str], extra: &[&str]) -> (u16, String) {
    let mut c = Command::new(weft_testkit::tools::require("curl"));
    c.args(["-s", "-m", "20", "-w", "\n%{http_code}", "-A", "curl/test"]);
    for h in headers {
        c.args(["-H", h]);
    }
    let o = c.args(extra).arg(format!("http://{addr}{path}")).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn httpbin_answers_status_delay_headers_ip_get_anything_uuid_and_logs_each_request() {
    let app = App::start(&["httpbin", "0", "--address", "127.0.0.1", "--version", "v2"], &[]);
    // /status/{code}, and a random choice among a comma list.
    assert_eq!(app.get("/status/418", &[]).0, 418);
    assert_eq!(app.get("/status/503", &[]).0, 503);
    assert_eq!(app.get("/status/abc", &[]).0, 400);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        seen.insert(app.get("/status/200,503", &[]).0);
    }
    assert_eq!(seen, [200, 503].into_iter().collect(), "both codes of the list are chosen");
    assert_eq!(app.get("/status/200:0,503:1", &[]).0, 503, "a zero weight is never chosen");

    // /headers: httpbin's shape and title-cased names; X-Forwarded-For hidden by default.
    let (code, body) = app.get("/headers", &["x-b3-traceid: abc", "X-Forwarded-For: 10.1.2.3"]);
    assert_eq!(code, 200);
    let v = json(&body);
    assert_eq!(v["headers"]["X-B3-Traceid"], "abc");
    assert_eq!(v["headers"]["User-Agent"], "curl/test");
    assert_eq!(v["headers"]["Host"], app.addr.to_string());
    assert!(v["headers"].get("X-Forwarded-For").is_none(), "{body}");
    assert!(body.starts_with("{\n  \"headers\": {\n"), "Flask's indentation: {body}");

    // /ip: the caller, or X-Forwarded-For when set.
    assert_eq!(json(&app.get("/ip", &[]).1)["origin"], "127.0.0.1");
    assert_eq!(json(&app.get("/ip", &["X-Forwarded-For: 10.1.2.3"]).1)["origin"], "10.1.2.3");

    // /get, /anything, /uuid, /user-agent, /.
    let v = json(&app.get("/get?a=1&b=two", &[]).1);
    assert_eq!((v["args"]["a"].as_str(), v["args"]["b"].as_str()), (Some("1"), Some("two")));
    assert_eq!(v["url"], format!("http://{}/get?a=1&b=two", app.addr));
    let (code, body) = curl(
        &app.addr.to_string(),
        "/anything/x",
        &["content-type: application/json"],
        &["-X", "PUT", "--data", "{\"k\": 1}"],
    );
    let v = json(&body);
    assert_eq!((code, v["method"].as_str(), v["json"]["k"].as_i64()), (200, Some("PUT"), Some(1)));
    assert_eq!(v["data"], "{\"k\": 1}");
    let uuid = json(&app.get("/uuid", &[]).1)["uuid"].as_str().unwrap().to_string();
    assert_eq!((uuid.len(), &uuid[14..15]), (36, "4"));
    assert_eq!(json(&app.get("/user-agent", &[]).1)["user-agent"], "curl/test");
    assert_eq!(app.get("/", &[]).0, 200);
    assert_eq!(app.get("/nope", &[]).0, 404);

    // /delay/{n}: answers after n seconds (capped at 10), like /get plus the body.
    let started = Instant::now();
    let (code, body) = app.get("/delay/1", &[]);
    assert!(started.elapsed() >= Duration::from_secs(1), "answered before the delay");
    assert_eq!((code, json(&body)["url"].as_str().is_some()), (200, true));
    assert_eq!(app.get("/delay/x", &[]).0, 400);

    // gunicorn's access log on stdout, one line per request.
    let line = app.wait_log("\"GET /headers HTTP/1.1\" 200");
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(line.ends_with("\"-\" \"curl/test\""), "{line}");
    app.wait_log("\"PUT /anything/x HTTP/1.1\" 200");
}

#[test]
fn tcp_echo_prefixes_every_line_with_its_version() {
    let app = App::start(&["tcp-echo", "0", "--address", "127.0.0.1", "--prefix", "two"], &[]);
    let mut s = TcpStream::connect(app.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    for line in ["hello world", "second line"] {
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        r.read_line(&mut reply).unwrap();
        assert_eq!(reply, format!("two {line}\n"));
    }
    app.wait_log("request: second line");
}

#[test]
fn helloworld_names_its_version_and_instance() {
    let app = App::start(
        &["helloworld", "0", "--address", "127.0.0.1"],
        &[("SERVICE_VERSION", "v2"), ("POD_NAME", "helloworld-v2-abcde")],
    );
    assert_eq!(app.get("/hello", &[]), (200, "Hello version: v2, instance: helloworld-v2-abcde\n".into()));
    assert_eq!(app.get("/health", &[]).0, 200);
    assert_eq!(app.get("/other", &[]).0, 404);
}

#[test]
fn sleep_idles_until_terminated() {
    let mut child = Command::new(WEFT).args(["demo", "sleep"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("idle"), "{line}");
    assert!(child.try_wait().unwrap().is_none(), "sleep must keep running");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = weft_testkit::process::wait_exit(&mut child, Duration::from_secs(30), "weft demo sleep after SIGTERM");
    assert!(status.success(), "{status}");
}

#[test]
fn load_prints_fortio_code_counts_and_percentiles() {
    let app = App::start(&["httpbin", "0", "--address", "127.0.0.1"], &[]);
    let url = format!("http://{}/status/200,503", app.addr);
    // Fortio's single-dash flags, as Istio's circuit-breaking task types them.
    let o = Command::new(WEFT)
        .args(["load", "-c", "3", "-qps", "0", "-n", "30", "-loglevel", "Warning", &url])
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    let count = |code: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("Code {code} : ")))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(count("200") + count("503"), 30, "{out}");
    assert!(count("200") > 0 && count("503") > 0, "{out}");
    for needle in
        ["# target 50% ", "# target 99% ", "Sockets used: 3 (for perfect keepalive, would be 3)", "All done 30 calls"]
    {
        assert!(out.contains(needle), "{needle:?} missing: {out}");
    }
    // The server saw exactly 30 requests.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.stdout.lock().unwrap().iter().filter(|l| l.contains("/status/200,503")).count() < 30 {
        assert!(Instant::now() < deadline, "httpbin did not log 30 requests");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(app.stdout.lock().unwrap().iter().filter(|l| l.contains("/status/200,503")).count(), 30);

    // Nothing listening: every call is counted as -1, and the run still ends.
    let dead = weft_testkit::net::reserve_addr();
    let o = Command::new(WEFT).args(["load", "-c", "1", "-n", "3", &format!("http://{dead}/")]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Code -1 : 3 (100.0 %)"), "{out}");
    // A bad URL is an error, not a panic.
    let o = Command::new(WEFT).args(["load", "ftp://x/"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not supported"));
}
