//! The backing-file policy for NBD backing names (`BackingPolicy::admit_nbd`, rules 5-7 of
//! `qcow_snapshot::policy`): without `--allow-backing` any server; with it, unix sockets only
//! inside the allowed trees and TCP servers only when listed with `--allow-nbd`.

use std::os::unix::net::UnixListener;

use qcow_snapshot::nbd::parse;
use qcow_snapshot::{BackingPolicy, OpenImageError};

fn refused(r: Result<(), OpenImageError>) -> String {
    match r {
        Err(OpenImageError::Refused(e)) => e.to_string(),
        other => panic!("expected a policy refusal, got {other:?}"),
    }
}

#[test]
fn an_unconfined_policy_admits_any_nbd_server() {
    let p = BackingPolicy::new();
    for name in [
        "nbd://example.org/base",
        "nbd+unix:///b?socket=/nonexistent/s",
    ] {
        p.admit_nbd(&parse(name).unwrap()).unwrap();
    }
}

#[test]
fn a_confined_policy_admits_sockets_inside_its_trees_and_listed_tcp_servers_only() {
    let inside = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let s_in = inside.path().join("in.sock");
    let s_out = outside.path().join("out.sock");
    let _l1 = UnixListener::bind(&s_in).unwrap();
    let _l2 = UnixListener::bind(&s_out).unwrap();
    std::fs::write(inside.path().join("file"), b"x").unwrap();
    let mut p = BackingPolicy::new();
    p.allow_dir(inside.path()).unwrap();

    let uri =
        |s: &std::path::Path| parse(&format!("nbd+unix:///b?socket={}", s.display())).unwrap();
    p.admit_nbd(&uri(&s_in)).unwrap();
    assert!(refused(p.admit_nbd(&uri(&s_out))).contains("outside the --allow-backing"));
    // A symlink inside the tree to a socket outside it is judged by its real path.
    std::os::unix::fs::symlink(&s_out, inside.path().join("link.sock")).unwrap();
    assert!(refused(p.admit_nbd(&uri(&inside.path().join("link.sock")))).contains("outside"));
    // A regular file is no NBD socket.
    assert!(refused(p.admit_nbd(&uri(&inside.path().join("file")))).contains("unix socket"));

    let tcp = parse("nbd://fileserver:10809/base").unwrap();
    assert!(refused(p.admit_nbd(&tcp)).contains("--allow-nbd fileserver:10809"));
    p.allow_nbd_server("fileserver:10809").unwrap();
    p.admit_nbd(&tcp).unwrap();
    // The default port is what the name means without one.
    p.admit_nbd(&parse("nbd://fileserver/base").unwrap())
        .unwrap();
    assert!(p.allow_nbd_server("no-port").is_err());
}

#[test]
fn the_trusted_snapshot_base_is_admitted_even_in_a_confined_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = BackingPolicy::new();
    p.allow_dir(dir.path()).unwrap();
    let name = "nbd://10.0.0.1/golden";
    assert!(p.admit_nbd(&parse(name).unwrap()).is_err());
    p.trust(std::path::Path::new(name)).unwrap();
    p.admit_nbd(&parse(name).unwrap()).unwrap();
}
