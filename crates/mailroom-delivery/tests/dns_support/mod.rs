//! A real, authoritative DNS server on 127.0.0.1 for integration tests.
//!
//! [`TestDns`] serves one in-memory zone rooted at `.`, so any name can be
//! used (`example.test`, `mx1.example.com`, ...). Names not added answer
//! NXDOMAIN; names with records answer NODATA for other types. UDP and TCP
//! listen on the same port, so `dns.addr()` is what goes into
//! `dns.nameservers`. The server stops when the `TestDns` is dropped.
//!
//! ```ignore
//! mod dns_support;
//! use dns_support::TestDns;
//!
//! let dns = TestDns::builder()
//!     .mx("example.test", 10, "mx1.example.test")
//!     .a("mx1.example.test", [127, 0, 0, 1])
//!     .aaaa("mx1.example.test", "::1".parse()?)
//!     .null_mx("nomail.test")           // RFC 7505 "MX 0 ."
//!     .servfail("broken.test")          // every query for it: SERVFAIL
//!     .silent("slow.test")              // never answered: client timeout
//!     .start()
//!     .await?;
//! let resolver = MxResolver::new(&dns.config())?;   // short timeout and TTLs
//! assert_eq!(dns.queries("example.test", RecordType::MX), 0);
//! ```
//!
//! Records get the TTL set by the last [`TestDnsBuilder::ttl`] call before
//! they were added (300 s by default); negative answers carry an SOA whose
//! TTL and MINIMUM are [`TestDnsBuilder::negative_ttl`] (60 s by default).
//! Every query the server receives is logged, so tests can check what was
//! asked and how often (see [`TestDns::queries`]).
//!
//! [`blackhole`] gives an address where nothing ever answers, for "the DNS
//! is down" tests.

#![allow(dead_code)]

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_server::ServerFuture;
use hickory_server::authority::{Catalog, MessageResponseBuilder, ZoneType};
use hickory_server::proto::op::{Header, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, MX, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryAuthority;
use mailroom_core::config::DnsConfig;
use tokio::net::{TcpListener, UdpSocket};

/// Query types, for [`TestDns::queries`].
pub use hickory_server::proto::rr::RecordType;

/// Builds a [`TestDns`]; see the module documentation.
pub struct TestDnsBuilder {
    ttl: u32,
    negative_ttl: u32,
    records: Vec<Record>,
    servfail: HashSet<LowerName>,
    silent: HashSet<LowerName>,
}

impl TestDnsBuilder {
    /// TTL, in seconds, of the records added after this call.
    pub fn ttl(mut self, seconds: u32) -> Self {
        self.ttl = seconds;
        self
    }

    /// TTL and MINIMUM of the zone's SOA, i.e. how long NXDOMAIN and NODATA
    /// answers may be cached (RFC 2308).
    pub fn negative_ttl(mut self, seconds: u32) -> Self {
        self.negative_ttl = seconds;
        self
    }

    /// `domain MX preference exchange`.
    pub fn mx(self, domain: &str, preference: u16, exchange: &str) -> Self {
        self.rdata(domain, RData::MX(MX::new(preference, name(exchange))))
    }

    /// `domain MX 0 .` (RFC 7505: the domain accepts no mail).
    pub fn null_mx(self, domain: &str) -> Self {
        self.rdata(domain, RData::MX(MX::new(0, Name::root())))
    }

    pub fn a(self, host: &str, addr: impl Into<Ipv4Addr>) -> Self {
        self.rdata(host, RData::A(A(addr.into())))
    }

    pub fn aaaa(self, host: &str, addr: impl Into<Ipv6Addr>) -> Self {
        self.rdata(host, RData::AAAA(AAAA(addr.into())))
    }

    /// An A or AAAA record, whichever `addr` is.
    pub fn addr(self, host: &str, addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(v4) => self.a(host, v4),
            IpAddr::V6(v6) => self.aaaa(host, v6),
        }
    }

    pub fn cname(self, alias: &str, target: &str) -> Self {
        self.rdata(alias, RData::CNAME(CNAME(name(target))))
    }

    pub fn txt(self, owner: &str, text: &str) -> Self {
        self.rdata(owner, RData::TXT(TXT::new(vec![text.to_owned()])))
    }

    /// Any other record, as is (its own TTL).
    pub fn record(mut self, record: Record) -> Self {
        self.records.push(record);
        self
    }

    /// Every query for `owner` (any type) gets SERVFAIL.
    pub fn servfail(mut self, owner: &str) -> Self {
        self.servfail.insert(LowerName::new(&name(owner)));
        self
    }

    /// Queries for `owner` (any type) are never answered.
    pub fn silent(mut self, owner: &str) -> Self {
        self.silent.insert(LowerName::new(&name(owner)));
        self
    }

    fn rdata(mut self, owner: &str, rdata: RData) -> Self {
        self.records
            .push(Record::from_rdata(name(owner), self.ttl, rdata));
        self
    }

    /// Binds UDP and TCP on one free port of 127.0.0.1 and starts serving.
    pub async fn start(self) -> io::Result<TestDns> {
        const SERIAL: u32 = 1;
        let mut authority = InMemoryAuthority::empty(Name::root(), ZoneType::Primary, false);
        let soa = SOA::new(
            name("ns.test"),
            name("hostmaster.test"),
            SERIAL,
            3600,
            600,
            86400,
            self.negative_ttl,
        );
        let records = std::iter::once(Record::from_rdata(
            Name::root(),
            self.negative_ttl,
            RData::SOA(soa),
        ))
        .chain(self.records);
        for record in records {
            if !authority.upsert_mut(record.clone(), SERIAL) {
                return Err(io::Error::other(format!("record refused: {record}")));
            }
        }
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&Name::root()), vec![Arc::new(authority)]);

        let queries = Arc::new(Mutex::new(Vec::new()));
        let handler = Handler {
            catalog,
            servfail: self.servfail,
            silent: self.silent,
            queries: Arc::clone(&queries),
        };
        let (udp, tcp) = bind_pair().await?;
        let addr = udp.local_addr()?;
        let mut server = ServerFuture::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5));
        Ok(TestDns {
            addr,
            queries,
            _server: server,
        })
    }
}

/// A running test DNS server; see the module documentation.
pub struct TestDns {
    addr: SocketAddr,
    queries: Arc<Mutex<Vec<(String, RecordType)>>>,
    _server: ServerFuture<Handler>,
}

impl TestDns {
    pub fn builder() -> TestDnsBuilder {
        TestDnsBuilder {
            ttl: 300,
            negative_ttl: 60,
            records: Vec::new(),
            servfail: HashSet::new(),
            silent: HashSet::new(),
        }
    }

    /// Where the server listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `[dns]` section pointing at this server, with a 1 s query timeout
    /// and answers cached for exactly 1 s.
    pub fn config(&self) -> DnsConfig {
        DnsConfig {
            nameservers: vec![self.addr],
            timeout: Duration::from_secs(1),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(1),
        }
    }

    /// How many queries for `owner` of type `query_type` arrived so far.
    pub fn queries(&self, owner: &str, query_type: RecordType) -> usize {
        let owner = normalize(owner);
        self.query_log()
            .iter()
            .filter(|(name, qtype)| *name == owner && *qtype == query_type)
            .count()
    }

    /// Every query so far, in arrival order: (name without trailing dot,
    /// lowercase; type).
    pub fn query_log(&self) -> Vec<(String, RecordType)> {
        self.queries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many queries arrived so far, all names and types.
    pub fn total_queries(&self) -> usize {
        self.queries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A UDP socket on 127.0.0.1 that never answers: point a resolver at its
/// address to test timeouts. Keep the socket alive for the test's length.
pub async fn blackhole() -> io::Result<(SocketAddr, UdpSocket)> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    Ok((socket.local_addr()?, socket))
}

/// UDP and TCP on the same free port (another process may take the TCP
/// port between the two binds: try a few ports).
async fn bind_pair() -> io::Result<(UdpSocket, TcpListener)> {
    let mut last_error = None;
    for _ in 0..10 {
        let udp = UdpSocket::bind("127.0.0.1:0").await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("no free port")))
}

fn name(text: &str) -> Name {
    let mut name = Name::from_ascii(text)
        .unwrap_or_else(|error| panic!("test DNS name {text:?} is invalid: {error}"));
    name.set_fqdn(true);
    name
}

fn normalize(owner: &str) -> String {
    owner.trim_end_matches('.').to_ascii_lowercase()
}

/// Logs each query, answers SERVFAIL or nothing for the names configured
/// so, and hands the rest to the zone.
struct Handler {
    catalog: Catalog,
    servfail: HashSet<LowerName>,
    silent: HashSet<LowerName>,
    queries: Arc<Mutex<Vec<(String, RecordType)>>>,
}

impl Handler {
    async fn handle<R: ResponseHandler>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let Ok(info) = request.request_info() else {
            return self.catalog.handle_request(request, response).await;
        };
        let owner = info.query.name().clone();
        self.queries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((normalize(&owner.to_string()), info.query.query_type()));

        if self.silent.contains(&owner) {
            return Header::response_from_request(request.header()).into();
        }
        if self.servfail.contains(&owner) {
            let message = MessageResponseBuilder::from_message_request(request)
                .error_msg(request.header(), ResponseCode::ServFail);
            return match response.send_response(message).await {
                Ok(info) => info,
                Err(_) => {
                    let mut header = Header::response_from_request(request.header());
                    header.set_response_code(ResponseCode::ServFail);
                    header.into()
                }
            };
        }
        self.catalog.handle_request(request, response).await
    }
}

// `RequestHandler` is an `async_trait`; this is its expansion, written out
// so the tests need no `async-trait` dependency.
impl RequestHandler for Handler {
    fn handle_request<'life0, 'life1, 'async_trait, R>(
        &'life0 self,
        request: &'life1 Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: ResponseHandler + 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.handle(request, response_handle))
    }
}
