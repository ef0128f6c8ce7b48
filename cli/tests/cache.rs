//! The local store as a cache: capacity, pins, gc, and crashes while it churns.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `shoal mount`, waits for it, runs `f`, then unmounts (or kills) it.
fn with_mount(env: &Env, reference: &str, mp: &Path, f: impl FnOnce()) {
    std::fs::create_dir_all(mp).unwrap();
    let mut child = env
        .cmd(&["mount", reference, mp.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(mp) {
        assert!(
            Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "mount did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    struct Guard<'a>(&'a Path, std::process::Child);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
            let _ = self.1.wait();
        }
    }
    let _g = Guard(mp, child);
    f();
}

/// Names and sizes of the store's segment files.
fn segments(home: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(home.join("store/segments"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().to_string(),
                        e.metadata().map(|m| m.len()).unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn pull_fetches(env: &Env, reference: &str) -> u64 {
    env.json(&["pull", reference, "--no-files"])["bytes_from_origin"]
        .as_u64()
        .unwrap()
}

#[test]
fn pin_gc_and_unpin() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "demo@v1"]);
    write(&src.join("v2-only.bin"), &random_bytes(77, 2 << 20));
    env.json(&[
        "publish",
        src.to_str().unwrap(),
        "demo@v2",
        "--tag",
        "latest",
    ]);

    let pin = env.json(&["pin", "demo@v1"]);
    assert!(pin["bytes_from_origin"].as_u64().unwrap() > 0);
    pull_fetches(&env, "demo@latest");
    let c = env.json(&["cache"]);
    assert_eq!(c["pins"][0]["name"], "demo@v1");
    assert_eq!(c["pinned_bytes"], pin["bytes"]);

    let freed = env.json(&["gc"])["freed_bytes"].as_u64().unwrap();
    assert!(freed >= 2 << 20, "v2's own chunks are freed: {freed}");
    assert_eq!(
        pull_fetches(&env, "demo@v1"),
        0,
        "the pinned version stays whole"
    );
    let dest = env.path("out");
    env.json(&["pull", "demo@v1", "--to", dest.to_str().unwrap()]);
    let cache = env.json(&["cache"]);
    assert!(cache["live_bytes"].as_u64().unwrap() >= pin["bytes"].as_u64().unwrap());

    env.json(&["unpin", "demo@v1"]);
    assert!(env.fails(&["unpin", "demo@v1"]).contains("is not pinned"));
    env.json(&["gc"]);
    assert_eq!(env.json(&["cache"])["live_bytes"], 0);
    assert!(pull_fetches(&env, "demo@v1") > 0);
}

#[test]
fn mount_under_cache_pressure_stays_correct_and_within_capacity() {
    let mut env = Env::new();
    let src = env.path("src");
    for i in 0..12 {
        write(
            &src.join(format!("big/f{i:02}.bin")),
            &random_bytes(300 + i, 2 << 20),
        );
    }
    let small = env.path("small");
    write(&small.join("keep.bin"), &random_bytes(9, 512 << 10));
    env.json(&["publish", src.to_str().unwrap(), "big@v1"]);
    env.json(&["publish", small.to_str().unwrap(), "small@v1"]);
    let cap: u64 = 8 << 20;
    env.extra_env
        .push(("SHOAL_CACHE_CAPACITY".into(), cap.to_string()));
    env.json(&["pin", "small@v1"]);
    // A pull that cannot fit is refused up front, with the way out named.
    let err = env.fails(&["pull", "big@v1", "--no-files"]);
    assert!(
        err.contains("capacity") && err.contains("shoal mount"),
        "{err}"
    );

    let mp = env.path("mnt");
    with_mount(&env, "big@v1", &mp, || {
        for _ in 0..2 {
            for i in 0..12 {
                let got = std::fs::read(mp.join(format!("big/f{i:02}.bin"))).unwrap();
                assert!(
                    got == random_bytes(300 + i, 2 << 20),
                    "f{i:02} read wrong through a full cache"
                );
            }
            // Fresh opens next round: drop the kernel's page cache of the mount.
            std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        }
    });
    let c = env.json(&["cache"]);
    assert!(c["disk_bytes"].as_u64().unwrap() <= cap, "{c}");
    assert!(
        c["live_bytes"].as_u64().unwrap() <= cap / 4 * 3 + (128 << 10),
        "{c}"
    );
    // The second pass found part of the data cached instead of everything churned out.
    assert!(c["hits"].as_u64().unwrap() > 20, "{c}");
    assert_eq!(
        pull_fetches(&env, "small@v1"),
        0,
        "the pinned version stays whole"
    );
}

#[test]
fn tiers_from_the_config_file_spill_down_and_keep_the_whole_version() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..12 {
        write(
            &src.join(format!("f{i:02}.bin")),
            &random_bytes(400 + i, 2 << 20),
        );
    }
    env.json(&["publish", src.to_str().unwrap(), "big@v1"]);
    let slow = env.path("slow-tier");
    std::fs::create_dir_all(&env.home).unwrap();
    std::fs::write(
        env.home.join("config.toml"),
        format!(
            "[cache]\ncapacity = \"6MiB\"\nmemory = \"2MiB\"\n\n[[cache.tier]]\npath = \"{}\"\ncapacity = \"40MiB\"\n",
            slow.display()
        ),
    )
    .unwrap();
    // 24 MiB through a mount: more than memory and the primary disk tier hold together.
    let mp = env.path("mnt");
    with_mount(&env, "big@v1", &mp, || {
        for _ in 0..2 {
            for i in 0..12 {
                let got = std::fs::read(mp.join(format!("f{i:02}.bin"))).unwrap();
                assert!(got == random_bytes(400 + i, 2 << 20), "f{i:02} read wrong");
            }
            std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        }
    });
    let c = env.json(&["cache"]);
    let tiers = c["tiers"].as_array().unwrap();
    assert_eq!(tiers.len(), 3, "{c}");
    assert_eq!(tiers[0]["kind"], "memory");
    assert_eq!(tiers[2]["path"], slow.display().to_string());
    let used = |t: &serde_json::Value| t["used_bytes"].as_u64().unwrap();
    assert!(used(&tiers[1]) <= (6 << 20) / 4 * 3, "{c}");
    assert!(used(&tiers[2]) <= (40 << 20) / 4 * 3, "{c}");
    assert!(
        used(&tiers[2]) > 0,
        "the slow tier took what the primary could not: {c}"
    );
    assert!(
        tiers[2]["hits"].as_u64().unwrap() > 0,
        "second pass hit the slow tier: {c}"
    );
    // Between them the disk tiers hold the whole version: a pull fetches nothing.
    assert_eq!(pull_fetches(&env, "big@v1"), 0, "{c}");
    // Pins live in the primary tier; this version does not fit there, and pin says so.
    let err = env.fails(&["pin", "big@v1"]);
    assert!(
        err.contains("primary disk tier") && err.contains("capacity"),
        "{err}"
    );
    // A config whose tiers cannot work is refused with the reason.
    std::fs::write(
        env.home.join("config.toml"),
        format!("[[cache.tier]]\npath = \"{}\"\n", slow.display()),
    )
    .unwrap();
    let err = env.fails(&["cache"]);
    assert!(err.contains("no capacity"), "{err}");
    // A relative path in the file is relative to the file's directory, whatever the working
    // directory of the command.
    std::fs::write(
        env.home.join("config.toml"),
        "[cache]\ncapacity = \"6MiB\"\n\n[[cache.tier]]\npath = \"tier2\"\ncapacity = \"40MiB\"\n",
    )
    .unwrap();
    let c = env.json(&["cache"]);
    assert_eq!(
        c["tiers"][2]["path"],
        env.home.join("tier2").display().to_string(),
        "{c}"
    );
}

#[test]
fn sigkill_while_the_cache_evicts_and_compacts_never_serves_a_corrupt_byte() {
    let mut env = Env::new();
    // Six versions of 3 MiB each; the cache holds about one and a half of them, so every pull
    // evicts what the previous ones left and compaction rewrites segments as it goes.
    let mut sources = Vec::new();
    for v in 0..6u64 {
        let src = env.path(&format!("src{v}"));
        for i in 0..3 {
            write(
                &src.join(format!("f{i}.bin")),
                &random_bytes(1000 * v + i, 1 << 20),
            );
        }
        env.json(&["publish", src.to_str().unwrap(), &format!("churn@v{v}")]);
        sources.push(src);
    }
    let cap: u64 = 6 << 20;
    env.extra_env
        .push(("SHOAL_CACHE_CAPACITY".into(), cap.to_string()));
    let mut killed = 0;
    for v in 0..6u64 {
        let reference = format!("churn@v{v}");
        let before = segments(&env.home);
        let mut child = env
            .cmd(&["pull", &reference, "--no-files"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill as soon as the store starts changing: mid-append, mid-eviction or mid-compaction.
        let deadline = Instant::now() + Duration::from_secs(30);
        while segments(&env.home) == before
            && child.try_wait().unwrap().is_none()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_micros(100));
        }
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // Whatever state the kill left, a complete pull now writes exactly the source.
        let dest = env.path(&format!("out{v}"));
        env.json(&["pull", &reference, "--to", dest.to_str().unwrap()]);
        assert_same_tree(&sources[v as usize], &dest);
        let c = env.json(&["cache"]);
        assert!(c["disk_bytes"].as_u64().unwrap() <= cap, "after v{v}: {c}");
    }
    assert!(killed >= 3, "only {killed} of 6 kills landed mid-pull");
    let c = env.json(&["cache"]);
    assert!(
        c["evictions"].as_u64().unwrap() > 0,
        "the cache never evicted: {c}"
    );
    // And the oldest version, long evicted, still pulls correctly.
    let dest = env.path("again");
    env.json(&["pull", "churn@v0", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&sources[0], &dest);
}

/// Versions `--json verify --local` finds whole here.
fn whole_here(env: &Env, r: &str) -> bool {
    let out = env.run(&["--json", "verify", r, "--local"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["local"]["complete"] == true
}

fn cached_names(env: &Env) -> Vec<String> {
    let c = env.json(&["cache"]);
    c["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_cache_ttl_expires_unused_versions_and_spares_shared_pinned_and_mounted_ones() {
    let mut env = Env::new();
    env.extra_env.push(("SHOAL_CACHE_TTL".into(), "6s".into()));
    let src = env.path("src");
    write(&src.join("shared.bin"), &random_bytes(1, 400_000));
    write(&src.join("own.bin"), &random_bytes(2, 300_000));
    env.json(&["publish", src.to_str().unwrap(), "ds@v1"]);
    std::fs::remove_file(src.join("own.bin")).unwrap();
    write(&src.join("new.bin"), &random_bytes(3, 300_000));
    env.json(&["publish", src.to_str().unwrap(), "ds@v2"]);
    let other = env.path("other");
    write(&other.join("o.bin"), &random_bytes(4, 200_000));
    env.json(&["publish", other.to_str().unwrap(), "other@v1"]);

    // Embedded: each pull, pin or mount applies the TTL first.
    for r in ["ds@v1", "ds@v2", "other@v1"] {
        env.json(&["pull", r, "--no-files"]);
    }
    env.json(&["pin", "other@v1"]);
    let c = env.json(&["cache"]);
    assert_eq!(c["ttl_s"], 6, "{c}");
    assert_eq!(cached_names(&env), ["ds@v1", "ds@v2", "other@v1"]);
    std::thread::sleep(Duration::from_secs(4));
    env.json(&["pull", "ds@v2", "--no-files"]); // v2 used again
    std::thread::sleep(Duration::from_secs(4));
    // v1 is 8 s unused, v2 4 s, other@v1 8 s but pinned.
    let before = stored_bytes(&env.home);
    env.json(&["pin", "other@v1"]);
    assert_eq!(cached_names(&env), ["ds@v2", "other@v1"]);
    assert!(!whole_here(&env, "ds@v1"), "v1's own file is gone");
    assert!(whole_here(&env, "ds@v2"), "what v2 shares with v1 stays");
    assert!(whole_here(&env, "other@v1"), "pinned");
    let freed = before - stored_bytes(&env.home);
    assert!((300_000..700_000).contains(&freed), "freed {freed}");

    // Through a daemon, which sweeps every quarter TTL: a mounted version stays while
    // mounted, then goes.
    let log = std::fs::File::create(env.path("node.log")).unwrap();
    let mut daemon = env
        .cmd(&["node", "run", "--no-mdns"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.run(&["status"]).status.success() {
        assert!(Instant::now() < deadline && daemon.try_wait().unwrap().is_none());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _daemon = Kill(daemon);
    env.json(&["pull", "ds@v1", "--no-files"]);
    let mp = env.path("mnt");
    let mount = Mounted::start(&env, "ds@v2", &mp, &[]);
    let gone = |env: &Env, name: &str| -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while cached_names(env).iter().any(|n| n == name) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        true
    };
    assert!(gone(&env, "ds@v1"), "v1 did not expire");
    // v1 expired (well past 6 s); the mounted v2 did not, and reads exactly.
    assert!(cached_names(&env).contains(&"ds@v2".to_string()));
    assert_eq!(
        std::fs::read(mp.join("new.bin")).unwrap(),
        random_bytes(3, 300_000)
    );
    let status = env.json(&["status"]).to_string();
    assert!(
        !status.contains("ds@v1"),
        "expired v1 still announced: {status}"
    );
    mount.stop(&env);
    assert!(gone(&env, "ds@v2"), "v2 did not expire once unmounted");
    assert!(whole_here(&env, "other@v1"));
}
