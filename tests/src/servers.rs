//! Small TCP services for the end-to-end tests, on 127.0.0.1 in background threads.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

fn serve(f: fn(TcpStream)) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || f(s));
        }
    });
    port
}

/// Echoes everything back; returns its port.
pub fn echo() -> u16 {
    serve(|mut s| {
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
    })
}

/// Reads to EOF, then answers the SHA-256 (hex) of what it read and the byte count.
pub fn hasher() -> u16 {
    serve(|mut s| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 256 * 1024];
        let mut n_total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    ctx.update(&buf[..n]);
                    n_total += n as u64;
                }
                Err(_) => return,
            }
        }
        let _ = write!(s, "{} {n_total}", hex(ctx.finish().as_ref()));
    })
}

/// Writes `len` deterministic bytes, then closes.
pub fn source(len: u64) -> u16 {
    static LEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    LEN.store(len, std::sync::atomic::Ordering::SeqCst);
    serve(|mut s| {
        let len = LEN.load(std::sync::atomic::Ordering::SeqCst);
        let mut sent = 0u64;
        let mut block = 0u64;
        while sent < len {
            let chunk = pattern(block);
            let n = chunk.len().min((len - sent) as usize);
            if s.write_all(&chunk[..n]).is_err() {
                return;
            }
            sent += n as u64;
            block += 1;
        }
    })
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
