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

/// The YAML of the first `weft apply -f - <<EOF ... EOF` in a sample's README.
fn readme_heredoc(task: &str) -> String {
    let text = std::fs::read_to_string(sample(task).join("README.md")).unwrap();
    let start =
        text.find("weft apply -f - <<EOF\n").expect("a heredoc in the README") + "weft apply -f - <<EOF\n".len();
    let len = text[start..].find("\nEOF\n").expect("the heredoc's end");
    text[start..start + len + 1].to_string()
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
    let mesh = UpMesh::start(&sample("mirroring"), &[], 3);

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
    let mesh = UpMesh::start(&sample("request-timeouts"), &[], 2);
    // Without a timeout the delayed answer comes back.
    assert_eq!(curl_status(&mesh, "sleep", "http://httpbin:8000/delay/2"), 200);

    mesh.apply_yaml(&readme_heredoc("request-timeouts"));
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
    let mesh = UpMesh::start(&sample("tcp-traffic-shifting"), &[], 3);
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
