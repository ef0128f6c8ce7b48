//! Origins behind real server processes: S3 (moto_server) and plain HTTP (nginx), started by the test and stopped when it ends, pass or fail.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on port {port} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A raw HTTP request; returns the status line.
fn http(port: u16, method: &str, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.lines().next().unwrap_or_default().to_string()
}

/// Starts moto_server on a free port with one bucket; returns the guard and the env vars
/// that point shoal at it.
fn moto() -> (Server, Vec<(String, String)>) {
    let port = free_port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start moto_server ({e}); the README's test command installs it (pip install 'moto[server]')"));
    let server = Server(child);
    wait_for_port(port, "moto_server");
    assert!(
        http(port, "PUT", "/shoal-test").contains("200"),
        "creating the test bucket failed"
    );
    let env = vec![
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        (
            "AWS_ENDPOINT_URL".into(),
            format!("http://127.0.0.1:{port}"),
        ),
    ];
    (server, env)
}

#[test]
fn s3_publish_pull_dedup_and_tags() {
    let (_server, vars) = moto();
    let mut env = Env::new();
    env.origin = "s3://shoal-test/team/datasets".into();
    env.extra_env = vars;
    let src = env.path("src");
    sample_tree(&src);
    let v1 = env.json(&[
        "publish",
        src.to_str().unwrap(),
        "demo@v1",
        "--tag",
        "latest",
    ]);
    write(&src.join("many/f00"), b"edited");
    let v2 = env.json(&["publish", src.to_str().unwrap(), "demo@v2"]);
    assert!(
        v2["new_bytes_uploaded"].as_u64().unwrap()
            < v1["new_bytes_uploaded"].as_u64().unwrap() / 10,
        "{v2}"
    );
    assert!(env
        .fails(&["publish", src.to_str().unwrap(), "demo@v2"])
        .contains("already exists"));

    // Tags move with a conditional put on S3.
    env.json(&["tag", "demo@v2", "latest"]);
    let versions = env.json(&["versions", "demo"]);
    assert_eq!(versions["versions"][1]["tags"][0], "latest");

    let other = env.peer("other");
    other.json(&["trust", &env.key()]);
    let dest = env.path("dest");
    let r = other.json(&["pull", "demo@latest", "--to", dest.to_str().unwrap()]);
    assert_eq!(r["version"], "demo@v2");
    assert_same_tree(&src, &dest);
    assert_eq!(
        other.json(&["pull", "demo@v2", "--no-files"])["bytes_from_origin"],
        0
    );
}

#[test]
fn s3_concurrent_publishes_of_one_version_have_exactly_one_winner() {
    let (_server, vars) = moto();
    let mut a = Env::new();
    a.origin = "s3://shoal-test/race".into();
    a.extra_env = vars;
    let b = a.peer("b");
    let (src_a, src_b) = (a.path("a"), a.path("b"));
    for (i, src) in [&src_a, &src_b].iter().enumerate() {
        for f in 0..8 {
            write(
                &src.join(format!("f{f}")),
                &random_bytes(100 * i as u64 + f, 1 << 20),
            );
        }
    }
    for round in 0..3 {
        let name = format!("race@r{round}");
        let pa = a
            .cmd(&["--json", "publish", src_a.to_str().unwrap(), &name])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pb = b
            .cmd(&["--json", "publish", src_b.to_str().unwrap(), &name])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (oa, ob) = (
            pa.wait_with_output().unwrap(),
            pb.wait_with_output().unwrap(),
        );
        assert!(
            oa.status.success() != ob.status.success(),
            "round {round}: exactly one publish must win"
        );
        let (winner, loser, src) = if oa.status.success() {
            (&a, &ob, &src_a)
        } else {
            (&b, &oa, &src_b)
        };
        let err = String::from_utf8_lossy(&loser.stderr);
        assert!(
            err.contains(&format!("version {name} already exists")),
            "{err}"
        );
        let dest = a.path(&format!("dest{round}"));
        winner.json(&["pull", &name, "--to", dest.to_str().unwrap()]);
        assert_same_tree(src, &dest);
    }
}

#[test]
fn http_origin_serves_pulls_read_only() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&[
        "publish",
        src.to_str().unwrap(),
        "demo@v1",
        "--tag",
        "latest",
    ]);
    let server = Nginx::start(&env.origin, env.dir.path());
    let mut other = env.peer("other");
    other.origin = server.url();
    other.json(&["trust", &env.key()]);
    let dest = env.path("dest");
    let r = other.json(&["pull", "demo@latest", "--to", dest.to_str().unwrap()]);
    assert_eq!(r["version"], "demo@v1");
    assert_same_tree(&src, &dest);
    // Writing through plain HTTP is refused with the origin named.
    let err = other.fails(&["publish", src.to_str().unwrap(), "demo@v2"]);
    assert!(err.contains(&other.origin), "{err}");
}
