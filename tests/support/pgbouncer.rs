//! A pgbouncer of the test's own: its config and port on 127.0.0.1, in front of the test
//! server, stopped when dropped. The binaries come from `.ci/pgbouncer` through
//! `ANNALS_PGBOUNCER` (1.21 or newer) and `ANNALS_PGBOUNCER_OLD` (Debian's 1.18).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The binary named by `var`, or `None` (with a notice) when it is not set. With
/// `ANNALS_REQUIRE_PGBOUNCER=1` a missing binary fails the test instead.
pub fn binary(var: &str) -> Option<PathBuf> {
    match std::env::var(var) {
        Ok(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ => {
            if std::env::var("ANNALS_REQUIRE_PGBOUNCER").as_deref() == Ok("1") {
                panic!("ANNALS_REQUIRE_PGBOUNCER=1 but {var} is not set: run .ci/pgbouncer");
            }
            eprintln!("{var} is not set (see .ci/pgbouncer): skipping this pgbouncer test");
            None
        }
    }
}

/// A running pgbouncer.
pub struct Pgbouncer {
    /// The database's URL through pgbouncer.
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Pgbouncer {
    /// Starts `binary` in transaction mode with `default_pool_size` server connections, in
    /// front of the database of `server_url`; `extra` lines are added to its `[pgbouncer]`
    /// section.
    pub fn start(binary: &PathBuf, server_url: &str, pool_size: u32, extra: &str) -> Pgbouncer {
        let (host, port, database) = parts(server_url);
        let dir = tempfile::tempdir().expect("temp dir");
        // pgbouncer refuses to run as root: it switches to `nobody`, who must reach its files.
        make_open(dir.path());
        let listen_port = free_port();
        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(path("userlist.txt"), "\"postgres\" \"\"\n").expect("userlist");
        let config = format!(
            "[databases]\n\
             {database} = host={host} port={port} dbname={database} user=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {listen_port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             pool_mode = transaction\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 200\n\
             logfile = {log}\n\
             pidfile = {pid}\n\
             {extra}\n",
            users = path("userlist.txt"),
            log = path("pgbouncer.log"),
            pid = path("pgbouncer.pid"),
        );
        std::fs::write(path("pgbouncer.ini"), config).expect("config");
        make_open(dir.path());
        let mut command = Command::new(binary);
        if is_root() {
            command.args(["-u", "nobody"]);
        }
        let child = command
            .arg(path("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start pgbouncer");
        wait_for_port(listen_port);
        Pgbouncer {
            url: format!("postgres://postgres@127.0.0.1:{listen_port}/{database}"),
            child,
            _dir: dir,
        }
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Host, port and database of a `postgres://user@host:port/database` URL.
fn parts(url: &str) -> (String, u16, String) {
    let rest = url.split_once('@').map_or(url, |(_, rest)| rest);
    let (authority, database) = rest.split_once('/').expect("a URL with a database");
    let database = database.split('?').next().unwrap_or(database).to_owned();
    let (host, port) = authority.split_once(':').unwrap_or((authority, "5432"));
    (host.to_owned(), port.parse().expect("a port"), database)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_port(port: u16) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("pgbouncer did not listen on {port}");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn make_open(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o666));
        }
    }
}
