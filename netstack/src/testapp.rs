//! Test support: an application on the other side of the TUN, played by a second smoltcp
//! interface at 100.80.0.1 that routes everything to the stack.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use crate::stack::device::Queues;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// An application on the other side of the TUN: a second smoltcp interface.
pub(crate) struct App {
    pub(crate) iface: Interface,
    pub(crate) sockets: SocketSet<'static>,
    pub(crate) queues: Queues,
    pub(crate) base: Instant,
}

impl App {
    pub(crate) fn new(now: Instant) -> Self {
        let mut queues = Queues::new(4096, 65535, false);
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut queues, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(100, 80, 0, 1), 16)).expect("addr");
        });
        let _ = iface.routes_mut().add_default_ipv4_route(Ipv4Addr::new(100, 80, 0, 2));
        App { iface, sockets: SocketSet::new(Vec::new()), queues, base: now }
    }

    pub(crate) fn connect(&mut self, dst: &str, local_port: u16) -> SocketHandle {
        let mut s =
            tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 512 * 1024]), tcp::SocketBuffer::new(vec![0; 512 * 1024]));
        s.set_nagle_enabled(false);
        s.connect(self.iface.context(), sa(dst), local_port).expect("connect");
        self.sockets.add(s)
    }

    pub(crate) fn socket(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    pub(crate) fn poll(&mut self, now: Instant) {
        let t = smoltcp::time::Instant::from_micros(now.duration_since(self.base).as_micros() as i64);
        self.iface.poll(t, &mut self.queues, &mut self.sockets);
    }
}
