//! Kernel time of one socket write on loopback TCP, by syscall: `send` (what std's
//! `TcpStream::write` makes) against `writev` (what `write_vectored` makes), one 1,148-byte
//! buffer each (a proxied 1 KB POST as one TLS record), and `writev` of two buffers (a
//! response head and its body) against `send` of the two copied into one. Each write is read
//! on the other end before the next, so the kernel does the whole loopback delivery each time.
//! The modes alternate every 10,000 writes, so a change in the machine's pace falls on all of
//! them alike. The time is this thread's time on the CPU (/proc/thread-self/schedstat, in
//! nanoseconds): nearly all of it is the kernel's (the loop's own work is a few instructions).
//! Usage: socket-writes [writes per mode per round, default 200000] [rounds, default 3]
use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};

/// This thread's time on the CPU so far, in nanoseconds.
fn cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("/proc/thread-self/schedstat");
    stat.split(' ').next().and_then(|f| f.parse().ok()).expect("run time")
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>().expect("a number"));
    let n = args.next().unwrap_or(200_000);
    let rounds = args.next().unwrap_or(3);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut tx = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
    let (mut rx, _) = listener.accept().expect("accept");
    tx.set_nodelay(true).expect("nodelay");
    let record = vec![b'x'; 1148];
    let (head, body) = (vec![b'h'; 123], vec![b'b'; 2]);
    let mut sink = vec![0u8; 65536];
    let modes: [(&str, &dyn Fn(&mut TcpStream) -> usize); 4] = [
        ("writev, 1 buffer", &|s| s.write_vectored(&[IoSlice::new(&record)]).expect("writev")),
        ("send, 1 buffer", &|s| s.write(&record).expect("send")),
        ("writev, head + body", &|s| {
            s.write_vectored(&[IoSlice::new(&head), IoSlice::new(&body)]).expect("writev")
        }),
        ("send, head + body copied", &|s| {
            let mut one = Vec::with_capacity(head.len() + body.len());
            one.extend_from_slice(&head);
            one.extend_from_slice(&body);
            s.write(&one).expect("send")
        }),
    ];
    println!("| round | syscall | µs on the CPU per write + read |");
    println!("| --- | --- | --- |");
    const BLOCK: u64 = 10_000;
    for round in 1..=rounds {
        let mut spent = [0u64; 4];
        for _ in 0..n.div_ceil(BLOCK) {
            for (i, (_, write)) in modes.iter().enumerate() {
                let start = cpu_ns();
                for _ in 0..BLOCK {
                    let mut left = write(&mut tx);
                    while left > 0 {
                        left -= rx.read(&mut sink[..left.min(65536)]).expect("read");
                    }
                }
                spent[i] += cpu_ns() - start;
            }
        }
        let writes = n.div_ceil(BLOCK) * BLOCK;
        for ((name, _), ns) in modes.iter().zip(spent) {
            println!("| {round} | {name} | {:.2} |", ns as f64 / 1e3 / writes as f64);
        }
    }
}
