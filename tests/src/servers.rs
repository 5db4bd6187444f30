//! Small TCP services for the end-to-end tests, on 127.0.0.1 in background threads.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

/// Serves each connection of `l` with `f` on a thread of its own; returns the port.
pub fn serve_on(l: TcpListener, f: impl Fn(TcpStream) + Send + Sync + 'static) -> u16 {
    let port = l.local_addr().unwrap().port();
    let f = std::sync::Arc::new(f);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let f = f.clone();
            std::thread::spawn(move || f(s));
        }
    });
    port
}

fn local() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// Echoes everything back; returns its port.
pub fn echo() -> u16 {
    serve_on(local(), echo_conn)
}

/// Reads to EOF, then answers the SHA-256 (hex) of what it read and the byte count.
pub fn hasher() -> u16 {
    serve_on(local(), hasher_conn)
}

/// Writes `len` deterministic bytes, then closes.
pub fn source(len: u64) -> u16 {
    serve_on(local(), move |s| source_conn(s, len))
}

/// One connection of [`echo`].
pub fn echo_conn(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// One connection of [`hasher`].
pub fn hasher_conn(mut s: TcpStream) {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                ctx.update(&buf[..n]);
                total += n as u64;
            }
            Err(_) => return,
        }
    }
    let _ = write!(s, "{} {total}", hex(ctx.finish().as_ref()));
}

/// One connection of [`source`].
pub fn source_conn(mut s: TcpStream, len: u64) {
    let (mut sent, mut block) = (0u64, 0u64);
    while sent < len {
        let chunk = pattern(block);
        let n = chunk.len().min((len - sent) as usize);
        if s.write_all(&chunk[..n]).is_err() {
            return;
        }
        sent += n as u64;
        block += 1;
    }
}

/// Block `i` of the deterministic stream: 64 KiB derived from its index.
pub fn pattern(i: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * 1024);
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < 64 * 1024 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// SHA-256 of the first `len` bytes of the deterministic stream.
pub fn pattern_sha256(len: u64) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let (mut done, mut i) = (0u64, 0u64);
    while done < len {
        let p = pattern(i);
        let n = p.len().min((len - done) as usize);
        ctx.update(&p[..n]);
        done += n as u64;
        i += 1;
    }
    hex(ctx.finish().as_ref())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
