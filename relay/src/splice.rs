//! Zero-copy forwarding on Linux: socket -> pipe -> socket with `splice(2)`, so payload bytes
//! never enter user space.
//!
//! The only module allowed `unsafe`: three system calls (`pipe2`, `fcntl(F_SETPIPE_SZ)`,
//! `splice`) on file descriptors this module owns (the pipe, wrapped in `OwnedFd` at once) or
//! borrows for the duration of the call (the sockets, kept alive by the `&TcpStream`).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// A kernel pipe used as the buffer of one direction.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A non-blocking pipe sized (best effort) to `size` bytes: the per-direction buffer.
    pub(crate) fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // A larger pipe than fs.pipe-max-size is refused for unprivileged users; the default
        // (64 KiB) then still works, only with more system calls per byte.
        // SAFETY: F_SETPIPE_SZ takes an int argument; the descriptor is open.
        let _ = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
        Ok(Pipe { read, write })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (owned by a `Pipe` or
    // borrowed from a live `TcpStream`); null offsets are required for pipes and sockets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Moves bytes `from` -> `to` through `pipe` until EOF (then half-closes `to`). `on_move` is
/// called with each chunk's size once it has been written.
pub(crate) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    chunk: usize,
    mut on_move: impl FnMut(usize),
) -> io::Result<()> {
    loop {
        // Fill: only when the pipe is empty, so EAGAIN here means "socket has nothing".
        from.readable().await?;
        let n = match from.try_io(Interest::READABLE, || splice(from.as_raw_fd(), pipe.write.as_raw_fd(), chunk)) {
            Ok(0) => {
                socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        // Drain all of it before reading more: the pipe is the whole buffer of this direction.
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => left -= k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        on_move(n);
    }
}
