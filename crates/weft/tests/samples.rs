//! Istio's tasks end to end on `weft up -f samples/<task>`, following each sample's
//! README: the real binary runs the workloads (weft's httpbin, sleep, tcp-echo) with their
//! sidecars; the task's resources are applied with `weft apply`; requests are made from
//! inside a workload with `weft exec sleep -- curl ...` (through its sidecar) or through
//! the ingress gateway; and the outcome the task's page describes is checked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/up_mesh.rs"]
mod up_mesh;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use up_mesh::UpMesh;

fn sample(task: &str) -> PathBuf {
    weft_testkit::conformance_dir().join(task)
}

fn task_file(name: &str) -> PathBuf {
    weft_testkit::conformance_dir().join("tasks/traffic-management").join(name)
}

/// The YAML of the `n`th (from 0) `weft apply -f - <<EOF ... EOF` in a sample's README.
fn readme_heredoc(task: &str, n: usize) -> String {
    const START: &str = "weft apply -f - <<EOF\n";
    let text = std::fs::read_to_string(sample(task).join("README.md")).unwrap();
    // Piece 0 is the text before the first heredoc.
    let rest = text.split(START).nth(n + 1).unwrap_or_else(|| panic!("no heredoc {n} in {task}'s README"));
    let len = rest.find("\nEOF\n").expect("the heredoc's end");
    rest[..len + 1].to_string()
}

/// `weft exec sleep -- curl -s -o /dev/null -w '%{http_code}' URL`: the status (0: none).
fn curl_status(mesh: &UpMesh, from: &str, url: &str) -> u16 {
    let (_, out) =
        mesh.weft(&["exec", from, "--", "curl", "-s", "-m", "20", "-o", "/dev/null", "-w", "%{http_code}", url]);
    out.trim().parse().unwrap_or(0)
}

#[test]
fn mirroring_sends_a_copy_of_every_request_to_httpbin_v2() {
    weft_testkit::tools::require("curl");
    let mesh = UpMesh::start(Some(&sample("mirroring")), &[], 3);

    // Step 1: all traffic to v1; the copies are not sent yet.
    mesh.apply(&task_file("mirroring-route-all-v1.yaml"));
    mesh.wait_config("sleep", "routes", |c| c.contains("outbound|8000|v1|httpbin"));
    for i in 0..3 {
        let (ok, out) = mesh.weft(&[
            "exec",
            "sleep",
            "--",
            "curl",
            "-sS",
            "-m",
            "20",
            &format!("http://httpbin:8000/headers?step=before-{i}"),
        ]);
        assert!(ok && out.contains("\"headers\""), "curl through the sidecar: {out}");
    }
    UpMesh::wait_for(
        "v1 logs the three requests",
        || mesh.log("httpbin-v1"),
        |l| l.matches("step=before-").count() == 3,
    );
    assert!(
        !mesh.log("httpbin-v2").contains("step=before-"),
        "v2 got requests before mirroring: {}",
        mesh.log("httpbin-v2")
    );

    // Step 2: mirror 100% to v2; both logs show each request (kubectl logs -> weft logs).
    mesh.apply(&task_file("mirroring-mirror-v2.yaml"));
    mesh.wait_config("sleep", "routes", |c| {
        c.split_whitespace().collect::<String>().contains("\"mirrors\":[\"outbound|8000|v2|httpbin")
    });
    for i in 0..3 {
        let (ok, out) = mesh.weft(&[
            "exec",
            "sleep",
            "--",
            "curl",
            "-sS",
            "-m",
            "20",
            &format!("http://httpbin:8000/headers?step=mirror-{i}"),
        ]);
        assert!(ok && out.contains("\"headers\""), "{out}");
    }
    let logs = |w: &str| mesh.weft(&["logs", w]).1;
    UpMesh::wait_for(
        "v1 logs the mirrored-step requests",
        || logs("httpbin-v1"),
        |l| l.matches("step=mirror-").count() == 3,
    );
    let v2 = UpMesh::wait_for(
        "v2 logs the mirrored copies",
        || logs("httpbin-v2"),
        |l| l.matches("step=mirror-").count() == 3,
    );
    // gunicorn's access-log line, as the task shows it.
    assert!(v2.lines().any(|l| l.contains("\"GET /headers?step=mirror-0 HTTP/1.1\" 200")), "{v2}");
}

#[test]
fn request_timeout_of_half_a_second_turns_a_two_second_delay_into_504() {
    weft_testkit::tools::require("curl");
    let mesh = UpMesh::start(Some(&sample("request-timeouts")), &[], 2);
    // Without a timeout the delayed answer comes back.
    assert_eq!(curl_status(&mesh, "sleep", "http://httpbin:8000/delay/2"), 200);

    mesh.apply_yaml(&readme_heredoc("request-timeouts", 0));
    mesh.wait_config("sleep", "routes", |c| c.contains("\"timeout\": \"0.5s\""));
    let (_, out) = mesh.weft(&[
        "exec",
        "sleep",
        "--",
        "curl",
        "-s",
        "-m",
        "20",
        "-w",
        "\n%{http_code}",
        "http://httpbin:8000/delay/2",
    ]);
    assert!(out.trim_end().ends_with("504"), "{out}");
    assert!(out.contains("upstream request timeout"), "{out}");
    // Other paths are not delayed and still answer.
    assert_eq!(curl_status(&mesh, "sleep", "http://httpbin:8000/get"), 200);
}

/// One connection through the gateway's TCP port: the echo of one line.
fn echo(addr: &str, line: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    s.write_all(format!("{line}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).map_err(|e| e.to_string())?;
    Ok(reply)
}

#[test]
fn tcp_traffic_shifting_sends_a_fifth_of_connections_to_tcp_echo_v2() {
    let mesh = UpMesh::start(Some(&sample("tcp-traffic-shifting")), &[], 3);
    // The task's gateway port is 31400; the test takes a free one instead.
    let port = weft_testkit::net::reserve_port();
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let text = std::fs::read_to_string(task_file(name)).unwrap().replace("31400", &port.to_string());
        let f = dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        f
    };

    mesh.apply(&copy("tcp-echo-all-v1.yaml"));
    let _ = UpMesh::wait_for(
        "the gateway echoes through v1",
        || echo(&addr, "ready"),
        |r| r.as_deref() == Ok("one ready\n"),
    );
    for i in 0..20 {
        assert_eq!(echo(&addr, &format!("line {i}")).unwrap(), format!("one line {i}\n"));
    }

    mesh.apply(&copy("tcp-echo-20-v2.yaml"));
    let _ = UpMesh::wait_for("v2 answers a connection", || echo(&addr, "probe"), |r| r.as_deref() == Ok("two probe\n"));
    let (mut one, mut two) = (0, 0);
    for i in 0..200 {
        match echo(&addr, &format!("n{i}")).unwrap().as_str() {
            r if r == format!("one n{i}\n") => one += 1,
            r if r == format!("two n{i}\n") => two += 1,
            other => panic!("unexpected echo {other:?}"),
        }
    }
    // 80/20 of 200: 40 expected to v2, standard deviation 5.7; the bounds are ~4 sigma.
    assert!((15..=70).contains(&two), "v1 {one}, v2 {two}");
}

#[test]
fn circuit_breaking_sample_loads_httpbin_through_the_fortio_sidecar() {
    weft_testkit::tools::require("curl");
    let mesh = UpMesh::start(Some(&sample("circuit-breaking")), &[], 2);
    mesh.apply(&task_file("circuit-breaking-httpbin-destination-rule.yaml"));
    mesh.wait_config("fortio", "clusters", |c| c.contains("outbound|8000||httpbin"));
    let (ok, out) = mesh.weft(&[
        "exec",
        "fortio",
        "--",
        "weft",
        "load",
        "-c",
        "2",
        "-qps",
        "0",
        "-n",
        "20",
        "-loglevel",
        "Warning",
        "http://httpbin:8000/get",
    ]);
    assert!(ok, "{out}");
    let count = |code: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("Code {code} : ")))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    // Every call answered by httpbin or refused by the sidecar's breaker, none lost.
    assert_eq!(count("200") + count("503"), 20, "{out}");
    assert!(count("200") > 0, "{out}");
    // They went through fortio's sidecar: its metrics count them towards httpbin.
    let metrics = format!("http://{}:15020/stats/prometheus", mesh.workloads["fortio"]);
    let counted = || -> u64 {
        let o = std::process::Command::new(weft_testkit::tools::require("curl"))
            .args(["-s", "-m", "5", &metrics])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("reporter=\"source\"")
                    && l.contains("destination_service_name=\"httpbin\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    UpMesh::wait_for("fortio's sidecar counts the 20 calls", counted, |n| *n == 20);
}

#[test]
fn egress_service_entry_reaches_an_external_httpbin_and_its_timeout_applies() {
    weft_testkit::tools::require("curl");
    // The "external" httpbin, outside the mesh (the README runs it on port 18000).
    let mut external = KillOnDrop(
        std::process::Command::new(up_mesh::WEFT)
            .args(["demo", "httpbin", "0", "--address", "127.0.0.1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(external.0.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let port = first.rsplit(':').next().unwrap().trim().to_string();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            sink.lock().unwrap().push_str(&(l + "\n"));
        }
    });
    let mesh = UpMesh::start(Some(&sample("egress")), &[], 1);

    // Unknown to the mesh: the sidecar has no route.
    assert_eq!(curl_status(&mesh, "sleep", "http://httpbin.example.com/headers"), 404);

    mesh.apply_yaml(&readme_heredoc("egress", 0).replace("18000", &port));
    mesh.wait_config("sleep", "clusters", |c| c.contains("httpbin.example.com"));
    let (ok, out) =
        mesh.weft(&["exec", "sleep", "--", "curl", "-sS", "-m", "20", "http://httpbin.example.com/headers?egress=1"]);
    assert!(ok && out.contains("\"Host\": \"httpbin.example.com\""), "{out}");
    // Nothing mesh-internal leaves the mesh: no peer metadata to a MESH_EXTERNAL host.
    assert!(!out.to_ascii_lowercase().contains("x-envoy-peer-metadata"), "peer metadata sent outside the mesh: {out}");
    UpMesh::wait_for(
        "the external httpbin logs the call",
        || log.lock().unwrap().clone(),
        |l| l.contains("GET /headers?egress=1 HTTP/1.1\" 200"),
    );

    mesh.apply_yaml(&readme_heredoc("egress", 1));
    mesh.wait_config("sleep", "routes", |c| c.contains("\"timeout\": \"3s\""));
    let (_, out) = mesh.weft(&[
        "exec",
        "sleep",
        "--",
        "curl",
        "-s",
        "-m",
        "20",
        "-w",
        "\n%{http_code}",
        "http://httpbin.example.com/delay/5",
    ]);
    assert!(out.trim_end().ends_with("504") && out.contains("upstream request timeout"), "{out}");
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn locality_failover_keeps_sleep_in_region1_until_it_drains_then_fails_over_to_region2() {
    weft_testkit::tools::require("curl");
    let mesh = UpMesh::start(Some(&sample("locality-failover")), &[], 5);
    mesh.apply_yaml(&readme_heredoc("locality-failover", 0));
    let hello = || {
        let (_, out) =
            mesh.weft(&["exec", "sleep", "--", "curl", "-sS", "-m", "20", "http://helloworld.sample:5000/hello"]);
        out
    };
    let all_from = |version: &'static str| {
        move |answers: &Vec<String>| answers.iter().all(|a| a.contains(&format!("Hello version: {version},")))
    };
    // Once the rule reaches sleep's sidecar, its own locality answers (four localities
    // round robin before that: 5 in a row from region1 by chance is 1 in 1,024).
    UpMesh::wait_for("sleep answered from region1", || (0..5).map(|_| hello()).collect(), all_from("region1.zone1"));
    let steady: Vec<String> = (0..10).map(|_| hello()).collect();
    assert!(all_from("region1.zone1")(&steady), "{steady:#?}");
    println!("before the drain: {}", steady[0].trim());
    // Fail region1 as the page does: its sidecar stops accepting; outlier detection ejects
    // it and the failover rule sends sleep to region2 (not region3 or region4).
    let drain = format!("http://{}:15000/drain_listeners?inboundonly", mesh.workloads["helloworld-region1-zone1"]);
    let out = std::process::Command::new(weft_testkit::tools::require("curl"))
        .args(["-sS", "-m", "10", "-X", "POST", &drain])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    UpMesh::wait_for("sleep failed over to region2", || (0..5).map(|_| hello()).collect(), all_from("region2.zone2"));
    let after: Vec<String> = (0..10).map(|_| hello()).collect();
    assert!(all_from("region2.zone2")(&after), "{after:#?}");
    println!("after the drain: {}", after[0].trim());
}
