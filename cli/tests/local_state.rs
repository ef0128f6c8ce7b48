//! Local state: private to its user, consistent after kill -9 at any point of pin, unpin, gc
//! and compaction, and what a node announces is what it can serve now.

mod common;
use common::*;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Runs `cmd` as the unprivileged user `nobody`; true if it succeeded.
fn as_nobody(cmd: &[&str]) -> bool {
    std::process::Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .args(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("runuser (util-linux) is needed to act as another user")
        .success()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(env: &Env, args: &[&str]) -> Daemon {
    let mut a = vec!["node", "run", "--no-mdns"];
    a.extend_from_slice(args);
    let log = std::fs::File::create(env.path("node.log")).unwrap();
    let mut child = env
        .cmd(&a)
        .env(
            "SHOAL_LOG",
            "warn,shoal_node=debug,shoal_swarm=debug,shoal_store=debug",
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.run(&["status"]).status.success() {
        assert!(Instant::now() < deadline, "daemon did not start");
        assert!(child.try_wait().unwrap().is_none(), "daemon exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon(child)
}

#[test]
fn state_is_private_to_its_user_and_the_socket_bounds_requests() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "ds@v1"]);
    env.json(&["pull", "ds@v1", "--no-files"]);
    assert_eq!(mode(&env.home), 0o700, "state directory");
    let segs: Vec<_> = std::fs::read_dir(env.home.join("store/segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!segs.is_empty());
    for s in &segs {
        assert_eq!(mode(s), 0o600, "{}", s.display());
    }
    // A state directory made open by someone else is made private again on next use.
    std::fs::set_permissions(&env.home, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&segs[0], std::fs::Permissions::from_mode(0o644)).unwrap();
    env.json(&["pull", "ds@v1", "--no-files"]);
    assert_eq!(mode(&env.home), 0o700);
    assert_eq!(mode(&segs[0]), 0o600);

    let _d = start_daemon(&env, &[]);
    let sock = env.home.join("node.sock");
    assert_eq!(mode(&sock), 0o600, "socket");
    // Another local user reaches neither the socket nor the cached bytes.
    let sock_s = sock.to_str().unwrap();
    let seg_s = segs[0].to_str().unwrap();
    assert!(
        !as_nobody(&["test", "-e", sock_s]),
        "nobody can reach the socket"
    );
    assert!(!as_nobody(&["cat", seg_s]), "nobody can read a segment");
    assert!(as_nobody(&["test", "-e", "/"]), "runuser works at all");

    // A request line longer than the bound is refused with a reason; the daemon goes on.
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let big = vec![b'x'; 3 << 20];
    let _ = s.write_all(&big); // the daemon may stop reading part-way
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.contains("longer than"), "reply: {reply:?}");
    // A request that is not JSON: an error reply, not a crash.
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"{\"op\": \"nonsense\"}\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("bad request"), "reply: {reply:?}");
    assert!(env.run(&["status"]).status.success(), "the daemon is up");
}

fn cache(env: &Env) -> serde_json::Value {
    env.json(&["cache"])
}

/// Pins are all or nothing: the pinned bytes are exactly those of the pins listed.
fn assert_pins_consistent(env: &Env, what: &str) -> bool {
    let c = cache(env);
    let pins = c["pins"].as_array().unwrap();
    let listed: u64 = pins.iter().map(|p| p["bytes"].as_u64().unwrap()).sum();
    let pinned = c["pinned_bytes"].as_u64().unwrap();
    assert_eq!(
        pinned, listed,
        "{what}: pinned bytes {pinned} but pins list {listed}: {c}"
    );
    !pins.is_empty()
}

#[test]
fn kill_during_pin_unpin_gc_and_compaction_leaves_counts_exact_and_no_corrupt_byte() {
    let env = Env::new();
    let src = env.path("src");
    // Many small blobs, so that pinning and unpinning take long enough to be cut.
    for i in 0..4000 {
        write(
            &src.join(format!("d{}/f{i}", i % 40)),
            &random_bytes(i, 1500 + (i as usize % 700)),
        );
    }
    for i in 0..6 {
        write(
            &src.join(format!("big{i}.bin")),
            &random_bytes(9000 + i, 3 << 20),
        );
    }
    env.json(&["publish", src.to_str().unwrap(), "ds@v1"]);
    write(&src.join("extra.bin"), &random_bytes(77, 8 << 20));
    env.json(&["publish", src.to_str().unwrap(), "ds@v2"]);
    env.json(&["pull", "ds@v1", "--no-files"]);

    // Rounds until enough kills landed mid-operation (the operations take tens of
    // milliseconds, so some finish before their kill): at most 40.
    let mut cut = 0;
    let mut rounds = 0;
    for round in 0..40u64 {
        if cut >= 6 {
            break;
        }
        rounds += 1;
        let (args, what): (Vec<&str>, &str) = match round % 3 {
            0 => (vec!["pin", "ds@v1"], "pin"),
            1 => (vec!["unpin", "ds@v1"], "unpin"),
            _ => (vec!["gc"], "gc"),
        };
        if what == "gc" {
            // Garbage to collect and compact: a version nobody pinned.
            env.json(&["pull", "ds@v2", "--no-files"]);
        }
        if what == "unpin" && !assert_pins_consistent(&env, "before unpin") {
            env.json(&["pin", "ds@v1"]);
        }
        let mut child = env
            .cmd(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let wait = Duration::from_millis(random_bytes(round, 1)[0] as u64 % 80 + 5);
        std::thread::sleep(wait);
        if child.try_wait().unwrap().is_none() {
            cut += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_pins_consistent(
            &env,
            &format!("after kill -9 during {what} (round {round})"),
        );
    }
    eprintln!("{cut} of {rounds} kills landed mid-operation");
    assert!(
        cut >= 6,
        "only {cut} of {rounds} kills landed mid-operation; the test proved little"
    );

    // Everything the store still claims is whole: a pin completes, and v1 then pulls from the
    // store alone (the origin is moved away), every byte verified on the way out.
    env.json(&["pin", "ds@v1"]);
    assert!(assert_pins_consistent(&env, "after the crashes"));
    env.json(&["gc"]);
    // Only the packs (the data) go away: versions and trees' locations still resolve.
    let packs = Path::new(&env.origin).join("packs");
    let moved = Path::new(&env.origin).join("packs-away");
    std::fs::rename(&packs, &moved).unwrap();
    let dest = env.path("out");
    let pulled = env
        .cmd(&["--json", "pull", "ds@v1", "--to", dest.to_str().unwrap()])
        .output()
        .unwrap();
    std::fs::rename(&moved, &packs).unwrap();
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&pulled.stdout).unwrap();
    assert_eq!(r["bytes_from_origin"], 0);
    // v1 is the source without the file v2 added.
    std::fs::remove_file(src.join("extra.bin")).unwrap();
    assert_same_tree(&src, &dest);
}

#[test]
fn gc_withdraws_what_a_node_can_no_longer_serve() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "ds@v1"]);
    write(&src.join("more.bin"), &random_bytes(5, 100_000));
    env.json(&["publish", src.to_str().unwrap(), "ds@v2"]);
    let _d = start_daemon(&env, &[]);
    env.json(&["pull", "ds@v1", "--no-files"]);
    env.json(&["pull", "ds@v2", "--no-files"]);
    env.json(&["pin", "ds@v2"]);
    let held = |env: &Env| -> Vec<String> {
        env.json(&["status"])["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    };
    let mut before = held(&env);
    before.sort();
    assert_eq!(before, ["ds@v1", "ds@v2"]);
    env.json(&["gc"]);
    // v1 was not pinned: gc took the blobs it does not share with v2, so it is withdrawn
    // before gc answers; the pinned v2 stays announced.
    assert_eq!(held(&env), ["ds@v2"]);
    let rec = std::fs::read_to_string(env.home.join("held")).unwrap();
    assert!(!rec.contains("ds@v1") && rec.contains("ds@v2"), "{rec}");
}

#[test]
fn local_clients_over_the_limit_are_told_so_and_the_daemon_goes_on() {
    let env = Env::new();
    std::fs::create_dir_all(&env.home).unwrap();
    std::fs::write(
        env.home.join("config.toml"),
        "[node.limits]\nmax_local_clients = 2\n",
    )
    .unwrap();
    let _d = start_daemon(&env, &[]);
    let sock = env.home.join("node.sock");
    // Two clients that connect and say nothing hold both places. The `status` that found the
    // daemon up may still hold its place for a moment, so a silent client can itself be
    // refused: the daemon then answers it and closes. A round counts only if neither silent
    // client was refused; a refused one shows as a reply to read.
    let refused = |s: &std::os::unix::net::UnixStream| {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut b = [0u8; 1];
        (&*s).read(&mut b).is_ok()
    };
    let mut round = 0;
    let idle = loop {
        round += 1;
        let idle: Vec<_> = (0..2)
            .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let out = env.run(&["status"]);
        if idle.iter().any(refused) && round < 10 {
            drop(idle);
            std::thread::sleep(Duration::from_millis(300));
            continue;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("most local clients (2"),
            "a client over the limit is told so: {err}"
        );
        break idle;
    };
    // Once they leave (or after the 10 s request deadline), their places come back.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !env.run(&["status"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the daemon serves again once clients leave"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_signature_failure_in_the_daemon_reaches_the_user_as_one() {
    let env = Env::new();
    let stranger = env.peer("stranger");
    let src = env.path("src");
    sample_tree(&src);
    stranger.json(&["publish", src.to_str().unwrap(), "theirs@v1"]);
    let _d = start_daemon(&env, &[]);
    let out = env.run(&["--json", "pull", "theirs@v1", "--no-files"]);
    assert!(!out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["kind"], "verify", "{doc}");
    assert!(
        doc["error"].as_str().unwrap().contains("not a trusted key"),
        "{doc}"
    );
    let out = env.run(&["--json", "pull", "theirs@nope", "--no-files"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["kind"], "not_found", "{doc}");
}

/// Flips one byte of the stored copy of `needle` (bytes of a file) in the store's segments;
/// returns the segment file.
fn damage_stored(home: &Path, needle: &[u8]) -> std::path::PathBuf {
    for e in std::fs::read_dir(home.join("store/segments")).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            let mut bytes = bytes;
            bytes[at + needle.len() / 2] ^= 0x55;
            // In place (the daemon's open file sees it): not a new file under the name.
            use std::io::{Seek, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.seek(std::io::SeekFrom::Start((at + needle.len() / 2) as u64))
                .unwrap();
            f.write_all(&bytes[at + needle.len() / 2..at + needle.len() / 2 + 1])
                .unwrap();
            return p;
        }
    }
    panic!("the bytes are in no segment");
}

/// `--json verify --local`, which may fail: (success, document).
fn verify_local(env: &Env, r: &str) -> (bool, serde_json::Value) {
    let out = env.run(&["--json", "verify", r, "--local"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.success(), doc)
}

#[test]
fn verify_local_names_missing_and_damaged_blobs_and_drops_the_damaged() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "ds@v1"]);
    // Before any pull: nothing here.
    let (ok, doc) = verify_local(&env, "ds@v1");
    assert!(!ok, "{doc}");
    assert_eq!(doc["local"]["missing"], 1, "the root node alone: {doc}");
    env.json(&["pull", "ds@v1", "--no-files"]);
    let (ok, doc) = verify_local(&env, "ds@v1");
    assert!(ok, "{doc}");
    assert_eq!(doc["local"]["complete"], true, "{doc}");
    assert!(doc["bytes_read"].as_u64().unwrap() >= 3_070_000, "{doc}");

    // One byte of big.bin's stored copy flipped: named, dropped, then missing.
    let big = std::fs::read(src.join("big.bin")).unwrap();
    damage_stored(&env.home, &big[1_000_000..1_000_064]);
    let (ok, doc) = verify_local(&env, "ds@v1");
    assert!(!ok, "{doc}");
    assert_eq!(doc["local"]["corrupt"], 1, "{doc}");
    assert_eq!(doc["local"]["missing"], 0, "{doc}");
    let problems = doc["problems"].to_string();
    assert!(
        problems.contains("/big.bin") && problems.contains("corrupt"),
        "{doc}"
    );
    let out = env.run(&["verify", "ds@v1", "--local"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lacks 1 blob(s)") && err.contains("/big.bin"),
        "{err}"
    );
    // A pull brings back what was dropped.
    env.json(&["pull", "ds@v1", "--no-files"]);
    assert!(verify_local(&env, "ds@v1").0);

    // Through the daemon, which owns the store: the damaged blob is dropped and the version,
    // no longer whole here, is no longer announced.
    let _d = start_daemon(&env, &[]);
    let held = |env: &Env| env.json(&["status"])["versions"].to_string();
    assert!(held(&env).contains("ds@v1"));
    damage_stored(&env.home, &big[2_000_000..2_000_064]);
    let (ok, doc) = verify_local(&env, "ds@v1");
    assert!(!ok, "{doc}");
    assert_eq!(doc["local"]["corrupt"], 1, "{doc}");
    assert!(!held(&env).contains("ds@v1"), "{}", held(&env));
    env.json(&["pull", "ds@v1", "--no-files"]);
    let (ok, doc) = verify_local(&env, "ds@v1");
    assert!(ok, "{doc}");
    // --all and --local are not one request.
    assert!(!env
        .run(&["verify", "ds", "--all", "--local"])
        .status
        .success());
}
