//! Child processes of the tests (`splitpay serve`, `worker`, `ops` …): killed when the test ends, pass or fail, or
//! when a test kills them itself; and a free loopback address for one to listen on.

use std::net::SocketAddr;
use std::process::Child;

/// A child process, SIGKILLed when dropped (a panicking test must not leave it running).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        kill(self);
    }
}

/// SIGKILL (std's `kill()` on Unix) and reap.
pub fn kill(child: &mut Proc) {
    let _ = child.0.kill();
    let _ = child.0.wait();
}

/// A loopback address nobody listens on right now.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}
