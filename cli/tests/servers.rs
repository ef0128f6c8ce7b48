//! Origins behind real server processes: S3 (moto_server) and plain HTTP (nginx), started by the test and stopped when it ends, pass or fail.

mod common;
use common::*;
use std::process::Stdio;

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
