//! `dns`: an authoritative DNS server for the delivery benchmarks.
//!
//! One in-memory zone, `<suffix>`, with `d0.<suffix>` … `d{N-1}.<suffix>`
//! each `MX 10 mx.<suffix>`, and `mx.<suffix>` `A` the given address. UDP
//! and TCP on the same port, so the address goes straight into mailroom's
//! `[dns] nameservers`. Other names in the zone answer NXDOMAIN, other types
//! NODATA (with the zone's SOA, so negative answers can be cached); names
//! outside the zone are REFUSED, as an authoritative-only server does.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use hickory_server::ServerFuture;
use hickory_server::authority::{Catalog, ZoneType};
use hickory_server::proto::rr::rdata::{A, MX, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryAuthority;
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};

use crate::args::Args;

pub const USAGE: &str = "\
mailroom-loadgen dns --listen IP:PORT [options]
  --domains N        answer MX for d0.SUFFIX .. d{N-1}.SUFFIX (default 100)
  --suffix NAME      the zone (default bench.test)
  --mx IP            A record of mx.SUFFIX, the exchange of every MX (default 127.0.0.2)
  --ttl SECONDS      TTL of every record (default 3600)
Serves UDP and TCP on the same address until SIGTERM/SIGINT. Prints
`dns: listening on ADDR` once both sockets are bound.";

pub async fn run(mut args: Args) -> Result<bool> {
    let listen: SocketAddr = args.required("listen")?;
    let domains: usize = args.get("domains", 100)?;
    let suffix: String = args.get("suffix", "bench.test".to_string())?;
    let mx: Ipv4Addr = args.get("mx", Ipv4Addr::new(127, 0, 0, 2))?;
    let ttl: u32 = args.get("ttl", 3600)?;
    args.finish()?;
    if domains == 0 {
        bail!("--domains must be greater than 0");
    }

    let origin = fqdn(&suffix)?;
    let exchange = fqdn(&format!("mx.{suffix}"))?;
    const SERIAL: u32 = 1;
    let mut zone = InMemoryAuthority::empty(origin.clone(), ZoneType::Primary, false);
    let soa = SOA::new(
        fqdn(&format!("ns.{suffix}"))?,
        fqdn(&format!("hostmaster.{suffix}"))?,
        SERIAL,
        3600,
        600,
        86400,
        ttl,
    );
    let mut records = vec![
        Record::from_rdata(origin.clone(), ttl, RData::SOA(soa)),
        Record::from_rdata(exchange.clone(), ttl, RData::A(A(mx))),
    ];
    for i in 0..domains {
        records.push(Record::from_rdata(
            fqdn(&format!("d{i}.{suffix}"))?,
            ttl,
            RData::MX(MX::new(10, exchange.clone())),
        ));
    }
    for record in records {
        if !zone.upsert_mut(record.clone(), SERIAL) {
            bail!("the zone refused a record: {record}");
        }
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone)]);

    let udp = UdpSocket::bind(listen)
        .await
        .with_context(|| format!("binding UDP {listen}"))?;
    let tcp = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding TCP {listen}"))?;
    let mut server = ServerFuture::new(catalog);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5));

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    println!(
        "dns: listening on {listen} (udp+tcp): MX d0..d{}.{suffix} -> mx.{suffix} A {mx}",
        domains - 1
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        done = server.block_until_done() => {
            done.map_err(|e| anyhow!("DNS server stopped: {e}"))?;
            bail!("DNS server stopped");
        }
    }
    Ok(true)
}

fn fqdn(text: &str) -> Result<Name> {
    let mut name = Name::from_ascii(text).map_err(|e| anyhow!("DNS name {text:?}: {e}"))?;
    name.set_fqdn(true);
    Ok(name)
}
