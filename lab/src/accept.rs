//! The accept loop of the lab's TCP servers (`labserver`, `greetserver`): a thread per
//! connection, at most `max_threads` at once (further connections wait in the backlog).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Accepts connections forever and serves each on its own thread with `serve`. Errors other
/// than a reset or broken connection are printed to stderr prefixed with `name`.
pub fn serve_connections<F>(listener: TcpListener, name: &str, max_threads: usize, serve: F) -> !
where
    F: Fn(TcpStream, SocketAddr) -> io::Result<()> + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    let active = Arc::new(AtomicUsize::new(0));
    let max = max_threads.max(1);
    loop {
        while active.load(Ordering::Acquire) >= max {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) => {
                eprintln!("{name}: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        active.fetch_add(1, Ordering::AcqRel);
        let (serve, conn_active, name_) =
            (Arc::clone(&serve), Arc::clone(&active), name.to_owned());
        let spawned = std::thread::Builder::new()
            .name(format!("conn-{peer}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                if let Err(e) = serve(stream, peer) {
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) {
                        eprintln!("{name_}: {peer}: {e}");
                    }
                }
                conn_active.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            eprintln!("{name}: cannot start a thread: {e}");
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
