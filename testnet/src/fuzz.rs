//! One function per decoder an outsider can feed, for the fuzz targets in `fuzz/` and for the
//! regression test that replays every input they found (`tests/fuzz_regressions.rs`). Each
//! takes arbitrary bytes and must return without panicking, whatever they are; what it checks
//! beyond that is written next to it.

use shoal_node::swarm::wire::{Auth, Req, Resp};
use shoal_registry::dirs::DirNode;
use shoal_registry::pack::PackIndex;
use shoal_registry::tree::{ChunkList, Dir, ListRef};
use shoal_registry::{AnyTag, Hash, SecretKey, SignedVersion};

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// The targets, by name (as `fuzz/fuzz_targets/<name>.rs` and `fuzz/regressions/<name>/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("tree_dir", tree_dir),
    ("chunk_list", chunk_list),
    ("pack_index", pack_index),
    ("version", version),
    ("tag", tag),
    ("ctl_message", ctl_message),
    ("bulk_request", bulk_request),
    ("daemon_request", daemon_request),
];

fn trusted() -> Vec<shoal_registry::TrustedKey> {
    vec![SecretKey::from_bytes([7; 32]).public().into()]
}

/// A directory node of either format: whatever decodes survives a round trip through the v2
/// encoding, and an inner node's children's spans follow one another.
pub fn tree_dir(data: &[u8]) {
    if let Ok(d) = DirNode::decode(data, None) {
        assert_eq!(
            DirNode::decode(&d.encode(), None).ok(),
            Some(d.clone()),
            "a decoded directory node round-trips"
        );
        let spans = d.spans(None);
        assert!(spans
            .windows(2)
            .all(|w| w[0].1.next.as_ref() == Some(&w[1].1.first)));
    }
}

/// A chunk-list node, against a reference taken from the input's first 12 bytes.
pub fn chunk_list(data: &[u8]) {
    if data.len() < 12 {
        return;
    }
    let r = ListRef {
        id: Hash([0; 32]),
        chunks: u32::from_le_bytes(data[..4].try_into().unwrap()),
        bytes: u64::from_le_bytes(data[4..12].try_into().unwrap()),
    };
    if let Ok(l) = ChunkList::decode(&data[12..], &r) {
        assert_eq!(l.chunks.len(), r.chunks as usize);
    }
}

/// A pack index: what decodes is laid out back to back.
pub fn pack_index(data: &[u8]) {
    if let Ok(idx) = PackIndex::decode(data) {
        let sum: u64 = idx.entries.iter().map(|e| e.len as u64).sum();
        assert_eq!(idx.raw_len(), sum);
        assert!(idx.pack_len() > 0 || sum == 0);
    }
}

/// A version object, decoded and verified (a random one never verifies).
pub fn version(data: &[u8]) {
    if let Ok(v) = SignedVersion::decode(data) {
        let _ = v.verify(&v.body.dataset.clone(), &v.body.version.clone(), &trusted());
    }
}

/// A tag object of either format, decoded and (if signed) verified.
pub fn tag(data: &[u8]) {
    if let Ok(AnyTag::Signed(t)) = AnyTag::decode(data) {
        let _ = t.verify(&t.body.dataset.clone(), &t.body.tag.clone(), &trusted());
    }
}

/// A control-protocol message, read through the same codec (and size limits) the node uses:
/// the first byte picks request, response or admission proof.
pub fn ctl_message(data: &[u8]) {
    use libp2p::request_response::Codec;
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let proto = libp2p::StreamProtocol::new(shoal_node::swarm::wire::PROTOCOL);
    futures::executor::block_on(async {
        let mut io = futures::io::Cursor::new(rest);
        match which % 3 {
            0 => {
                let mut c = libp2p::request_response::cbor::codec::Codec::<Req, Resp>::default()
                    .set_request_size_maximum(1 << 20);
                let _ = c.read_request(&proto, &mut io).await;
            }
            1 => {
                let mut c = libp2p::request_response::cbor::codec::Codec::<Req, Resp>::default()
                    .set_response_size_maximum(10 << 20);
                if let Ok(Resp::Have(
                    _,
                    Some(shoal_node::swarm::wire::Held { map: Some(map), .. }),
                )) = c.read_response(&proto, &mut io).await
                {
                    // A have-map from a peer is used for bit lookups: none may panic.
                    for i in [0usize, 1, 63, 64, map.len as usize, usize::MAX / 2] {
                        let _ = map.get(i);
                    }
                    let _ = map.count();
                }
            }
            _ => {
                let mut c = libp2p::request_response::cbor::codec::Codec::<Auth, Auth>::default()
                    .set_request_size_maximum(1 << 10);
                let _ = c.read_request(&proto, &mut io).await;
            }
        }
    });
}

/// A bulk-channel request frame: at most `MAX_IDS` ids come out.
pub fn bulk_request(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut r = data;
        while let Ok((ids, _)) = shoal_node::swarm::bulk::read_request(&mut r).await {
            assert!(ids.len() <= shoal_node::swarm::bulk::MAX_IDS);
        }
    });
}

/// A daemon request line.
pub fn daemon_request(data: &[u8]) {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = shoal_node::daemon::parse_request(line);
    }
}

/// Valid inputs for every target (a seed corpus, and a check that the targets accept what
/// the node itself writes).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use shoal_registry::tree::{ChunkRef, Entry, EntryKind, FileContent};
    use shoal_registry::{Params, SignedTag, Stats, TagBody, VersionBody};
    let key = SecretKey::from_bytes([7; 32]);
    let chunk = ChunkRef {
        id: Hash([1; 32]),
        len: 100,
    };
    let dir = Dir {
        entries: vec![
            Entry {
                name: "a".into(),
                mode: 0o644,
                kind: EntryKind::File {
                    size: 100,
                    content: FileContent::Chunks(vec![chunk]),
                },
            },
            Entry {
                name: "l".into(),
                mode: 0o777,
                kind: EntryKind::Symlink { target: "a".into() },
            },
        ],
    };
    let list = ChunkList {
        chunks: vec![chunk, chunk],
    };
    let mut list_seed = Vec::new();
    list_seed.extend_from_slice(&2u32.to_le_bytes());
    list_seed.extend_from_slice(&200u64.to_le_bytes());
    list_seed.extend_from_slice(&list.encode());
    let mut pack = shoal_registry::pack::PackBuilder::default();
    pack.push(Hash([1; 32]), bytes::Bytes::from_static(b"x"));
    let idx = pack.seal().index_bytes;
    let version = SignedVersion::sign(
        VersionBody {
            dataset: "ds".into(),
            version: "v1".into(),
            root: Hash([2; 32]),
            packs: vec![Hash([3; 32])],
            chunking: Params::default(),
            created_unix: 1,
            stats: Stats::default(),
            publisher: [0; 32],
        },
        &key,
    )
    .encode();
    let tag = SignedTag::sign(
        TagBody {
            dataset: "ds".into(),
            tag: "latest".into(),
            version: "v1".into(),
            seq: 3,
            updated_unix: 4,
            publisher: [0; 32],
        },
        &key,
    )
    .encode();
    let mut bulk = Vec::new();
    bulk.extend_from_slice(&2u32.to_be_bytes());
    bulk.extend_from_slice(&[1; 64]);
    bulk.extend_from_slice(&(1u32 | 1 << 31).to_be_bytes());
    bulk.extend_from_slice(&[2; 64]);
    let daemon = br#"{"op":"pull","reference":"ds@v1","to":null,"origin":"/tmp/o","trusted":["ed25519:ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c org/*"]}"#.to_vec();
    // v2 nodes: a leaf and an inner node over leaves.
    let many = (0..600).map(|i| Entry {
        name: format!("f{i:04}"),
        mode: 0o644,
        kind: EntryKind::File {
            size: 100,
            content: FileContent::Chunks(vec![chunk]),
        },
    });
    let (top, nodes) = shoal_registry::dirs::build_all(many).expect("sorted names");
    let leaf = DirNode::Leaf(dir.entries.clone()).encode();
    let mut out = vec![
        ("tree_dir", dir.encode()),
        ("tree_dir", leaf),
        ("tree_dir", nodes[&top.id].clone()),
        ("chunk_list", list_seed),
        ("pack_index", idx),
        ("version", version),
        ("tag", tag),
        (
            "tag",
            shoal_registry::Tag {
                version: "v1".into(),
                updated_unix: 1,
            }
            .encode(),
        ),
        ("bulk_request", bulk),
        ("daemon_request", daemon),
    ];
    // Control messages as the codec frames them (the first byte picks the kind).
    use libp2p::request_response::Codec;
    let proto = libp2p::StreamProtocol::new(shoal_node::swarm::wire::PROTOCOL);
    let hello = shoal_node::swarm::wire::Hello {
        labels: Default::default(),
        bulk_port: 4001,
        listen: vec!["/ip4/10.0.0.1/tcp/4001".into()],
        versions: vec![([2; 32], shoal_node::swarm::Holding::Complete)],
        peers: vec![],
    };
    let mut map = shoal_node::swarm::HaveMap::new(130);
    map.set(3);
    map.set(129);
    futures::executor::block_on(async {
        let mut c = libp2p::request_response::cbor::codec::Codec::<Req, Resp>::default();
        let delta = shoal_node::swarm::wire::Delta::new([2; 32], 7, 0, &[3, 129]);
        for req in [
            Req::Hello(hello.clone()),
            Req::Have([2; 32]),
            Req::HaveDelta(delta),
        ] {
            let mut w = futures::io::Cursor::new(Vec::new());
            c.write_request(&proto, &mut w, req).await.ok();
            let mut buf = vec![0u8];
            buf.extend(w.into_inner());
            out.push(("ctl_message", buf));
        }
        for resp in [
            Resp::Hello(hello),
            Resp::Have(
                [2; 32],
                Some(shoal_node::swarm::wire::Held {
                    holding: shoal_node::swarm::Holding::Pulling,
                    map: Some(map),
                    epoch: 7,
                    upto: 2,
                }),
            ),
        ] {
            let mut w = futures::io::Cursor::new(Vec::new());
            c.write_response(&proto, &mut w, resp).await.ok();
            let mut buf = vec![1u8];
            buf.extend(w.into_inner());
            out.push(("ctl_message", buf));
        }
        let mut a = libp2p::request_response::cbor::codec::Codec::<Auth, Auth>::default();
        let mut w = futures::io::Cursor::new(Vec::new());
        a.write_request(&proto, &mut w, Auth([9; 32])).await.ok();
        let mut buf = vec![2u8];
        buf.extend(w.into_inner());
        out.push(("ctl_message", buf));
    });
    out
}
