//! MX resolution against a real DNS server on 127.0.0.1 (see `dns_support`).

mod dns_support;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use dns_support::{RecordType, TestDns, blackhole};
use mailroom_core::config::DnsConfig;
use mailroom_delivery::dns::{DnsError, MxHost, MxResolver};

const V4_1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const V4_2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const V4_3: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
const V6_1: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

fn resolver(config: &DnsConfig) -> MxResolver {
    MxResolver::new(config).expect("resolver for the test DNS server")
}

fn names(hosts: &[MxHost]) -> Vec<&str> {
    hosts.iter().map(|host| host.name.as_str()).collect()
}

#[tokio::test]
async fn mx_hosts_come_in_preference_order_with_their_addresses() {
    let dns = TestDns::builder()
        .mx("example.test", 20, "mx2.example.test")
        .mx("example.test", 10, "mx1.example.test")
        .mx("example.test", 30, "MX3.Example.Test")
        .a("mx1.example.test", V4_1)
        .a("mx2.example.test", V4_2)
        .a("mx3.example.test", V4_3)
        .start()
        .await
        .expect("test DNS server");

    let hosts = resolver(&dns.config())
        .resolve("example.test")
        .await
        .expect("MX hosts");

    assert_eq!(
        hosts,
        vec![
            MxHost {
                name: "mx1.example.test".into(),
                preference: 10,
                addrs: vec![IpAddr::V4(V4_1)],
            },
            MxHost {
                name: "mx2.example.test".into(),
                preference: 20,
                addrs: vec![IpAddr::V4(V4_2)],
            },
            MxHost {
                name: "mx3.example.test".into(),
                preference: 30,
                addrs: vec![IpAddr::V4(V4_3)],
            },
        ]
    );
}

#[tokio::test]
async fn equal_preferences_are_tried_in_random_order() {
    let dns = TestDns::builder()
        .mx("example.test", 10, "a.example.test")
        .mx("example.test", 10, "b.example.test")
        .mx("example.test", 10, "c.example.test")
        .mx("example.test", 20, "backup.example.test")
        .a("a.example.test", V4_1)
        .a("b.example.test", V4_1)
        .a("c.example.test", V4_1)
        .a("backup.example.test", V4_2)
        .start()
        .await
        .expect("test DNS server");
    let resolver = resolver(&dns.config());

    // From the cache: every call shuffles afresh, with one query in all.
    let mut firsts = HashSet::new();
    for _ in 0..40 {
        let hosts = resolver.resolve("example.test").await.expect("MX hosts");
        assert_eq!(hosts.len(), 4);
        assert_eq!(hosts[3].name, "backup.example.test");
        let mut top: Vec<&str> = names(&hosts[..3]);
        firsts.insert(top[0].to_owned());
        top.sort_unstable();
        assert_eq!(top, ["a.example.test", "b.example.test", "c.example.test"]);
    }
    assert!(firsts.len() > 1, "always the same first host: {firsts:?}");
    assert_eq!(dns.queries("example.test", RecordType::MX), 1);

    // Uncached: each call asks again, and is shuffled too.
    let mut orders = HashSet::new();
    for _ in 0..20 {
        let hosts = resolver
            .resolve_uncached("example.test")
            .await
            .expect("MX hosts");
        orders.insert(names(&hosts).join(","));
    }
    assert!(orders.len() > 1, "always the same order: {orders:?}");
    assert_eq!(dns.queries("example.test", RecordType::MX), 21);
}

#[tokio::test]
async fn no_mx_means_the_domain_itself_is_the_mail_host() {
    let dns = TestDns::builder()
        .a("plain.test", V4_1)
        .aaaa("plain.test", V6_1)
        .start()
        .await
        .expect("test DNS server");

    let hosts = resolver(&dns.config())
        .resolve("plain.test")
        .await
        .expect("implicit MX");

    assert_eq!(
        hosts,
        vec![MxHost {
            name: "plain.test".into(),
            preference: 0,
            addrs: vec![IpAddr::V4(V4_1), IpAddr::V6(V6_1)],
        }]
    );
}

#[tokio::test]
async fn aaaa_addresses_are_returned() {
    let dns = TestDns::builder()
        .mx("example.test", 10, "dual.example.test")
        .mx("example.test", 20, "v6only.example.test")
        .a("dual.example.test", V4_1)
        .aaaa("dual.example.test", V6_1)
        .aaaa("v6only.example.test", Ipv6Addr::LOCALHOST)
        .start()
        .await
        .expect("test DNS server");

    let hosts = resolver(&dns.config())
        .resolve("example.test")
        .await
        .expect("MX hosts");

    assert_eq!(names(&hosts), ["dual.example.test", "v6only.example.test"]);
    assert_eq!(hosts[0].addrs, [IpAddr::V4(V4_1), IpAddr::V6(V6_1)]);
    assert_eq!(hosts[1].addrs, [IpAddr::V6(Ipv6Addr::LOCALHOST)]);
}

#[tokio::test]
async fn null_mx_is_permanent() {
    let dns = TestDns::builder()
        .null_mx("nomail.test")
        .a("nomail.test", V4_1)
        .start()
        .await
        .expect("test DNS server");

    let error = resolver(&dns.config())
        .resolve("nomail.test")
        .await
        .expect_err("null MX");

    assert_eq!(
        error,
        DnsError::NullMx {
            domain: "nomail.test".into()
        }
    );
    assert!(error.is_permanent());
    // The A record must not be used as an implicit MX.
    assert_eq!(dns.queries("nomail.test", RecordType::A), 0);
}

#[tokio::test]
async fn nxdomain_is_permanent() {
    let dns = TestDns::builder().start().await.expect("test DNS server");

    let error = resolver(&dns.config())
        .resolve("Nowhere.Test.")
        .await
        .expect_err("NXDOMAIN");

    assert_eq!(
        error,
        DnsError::NoSuchDomain {
            domain: "nowhere.test".into()
        }
    );
    assert!(error.is_permanent());
}

#[tokio::test]
async fn a_name_without_mail_records_has_no_mail_hosts() {
    let dns = TestDns::builder()
        .txt("textonly.test", "v=spf1 -all")
        .start()
        .await
        .expect("test DNS server");

    let error = resolver(&dns.config())
        .resolve("textonly.test")
        .await
        .expect_err("NODATA");

    assert_eq!(
        error,
        DnsError::NoMailHosts {
            domain: "textonly.test".into()
        }
    );
    assert!(error.is_permanent());
    assert_eq!(dns.queries("textonly.test", RecordType::A), 1);
    assert_eq!(dns.queries("textonly.test", RecordType::AAAA), 1);
}

#[tokio::test]
async fn servfail_is_temporary() {
    let dns = TestDns::builder()
        .servfail("broken.test")
        .start()
        .await
        .expect("test DNS server");

    let error = resolver(&dns.config())
        .resolve("broken.test")
        .await
        .expect_err("SERVFAIL");

    assert!(
        matches!(&error, DnsError::Temporary { domain, .. } if domain == "broken.test"),
        "{error:?}"
    );
    assert!(!error.is_permanent());
}

#[tokio::test]
async fn an_unanswered_query_times_out_as_temporary() {
    let dns = TestDns::builder()
        .silent("slow.test")
        .start()
        .await
        .expect("test DNS server");
    let config = DnsConfig {
        timeout: Duration::from_millis(200),
        ..dns.config()
    };

    let started = Instant::now();
    let error = resolver(&config)
        .resolve("slow.test")
        .await
        .expect_err("timeout");

    assert!(matches!(error, DnsError::Temporary { .. }), "{error:?}");
    assert!(!error.is_permanent());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_dead_nameserver_is_temporary() {
    let (addr, _socket) = blackhole().await.expect("UDP socket");
    let config = DnsConfig {
        nameservers: vec![addr],
        timeout: Duration::from_millis(200),
        min_ttl: Duration::from_secs(1),
        max_ttl: Duration::from_secs(1),
    };

    let started = Instant::now();
    let error = resolver(&config)
        .resolve("example.test")
        .await
        .expect_err("timeout");

    assert!(matches!(error, DnsError::Temporary { .. }), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn mx_hosts_without_addresses_are_skipped() {
    let dns = TestDns::builder()
        .mx("example.test", 10, "ghost.example.test")
        .mx("example.test", 20, "flaky.example.test")
        .mx("example.test", 30, "mx.example.test")
        .servfail("flaky.example.test")
        .a("mx.example.test", V4_1)
        .mx("allbad.test", 10, "ghost.allbad.test")
        .mx("allbad.test", 20, "flaky.example.test")
        .start()
        .await
        .expect("test DNS server");
    let resolver = resolver(&dns.config());

    let hosts = resolver.resolve("example.test").await.expect("MX hosts");
    assert_eq!(names(&hosts), ["mx.example.test"]);

    let error = resolver
        .resolve("allbad.test")
        .await
        .expect_err("no MX host has an address");
    assert!(matches!(error, DnsError::Temporary { .. }), "{error:?}");
}

#[tokio::test]
async fn cnames_are_followed() {
    let dns = TestDns::builder()
        .cname("alias.test", "example.test")
        .mx("example.test", 10, "mx.example.test")
        .cname("mx.example.test", "real.example.test")
        .a("real.example.test", V4_1)
        .start()
        .await
        .expect("test DNS server");

    let hosts = resolver(&dns.config())
        .resolve("alias.test")
        .await
        .expect("MX hosts");

    assert_eq!(names(&hosts), ["mx.example.test"]);
    assert_eq!(hosts[0].addrs, [IpAddr::V4(V4_1)]);
}

#[tokio::test]
async fn answers_are_cached_until_the_clamped_ttl() {
    // Records say 300 s; max_ttl (300 ms) wins.
    let dns = TestDns::builder()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", V4_1)
        .start()
        .await
        .expect("test DNS server");
    let config = DnsConfig {
        min_ttl: Duration::from_millis(100),
        max_ttl: Duration::from_millis(300),
        ..dns.config()
    };
    let resolver = resolver(&config);

    let first = resolver.resolve("example.test").await.expect("MX hosts");
    let second = resolver.resolve("EXAMPLE.test.").await.expect("cached");
    assert_eq!(first, second);
    assert_eq!(dns.queries("example.test", RecordType::MX), 1);
    assert_eq!(dns.queries("mx.example.test", RecordType::A), 1);

    tokio::time::sleep(Duration::from_millis(350)).await;
    resolver.resolve("example.test").await.expect("MX hosts");
    assert_eq!(dns.queries("example.test", RecordType::MX), 2);
    assert_eq!(dns.queries("mx.example.test", RecordType::A), 2);
}

#[tokio::test]
async fn the_smallest_record_ttl_bounds_the_cache() {
    // The A record's 1 s TTL wins over the MX's 300 s and max_ttl's 60 s.
    let dns = TestDns::builder()
        .mx("example.test", 10, "mx.example.test")
        .ttl(1)
        .a("mx.example.test", V4_1)
        .start()
        .await
        .expect("test DNS server");
    let config = DnsConfig {
        max_ttl: Duration::from_secs(60),
        ..dns.config()
    };
    let resolver = resolver(&config);

    resolver.resolve("example.test").await.expect("MX hosts");
    resolver.resolve("example.test").await.expect("cached");
    assert_eq!(dns.queries("example.test", RecordType::MX), 1);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    resolver.resolve("example.test").await.expect("MX hosts");
    assert_eq!(dns.queries("example.test", RecordType::MX), 2);
}

#[tokio::test]
async fn negative_and_temporary_answers_are_cached() {
    let dns = TestDns::builder()
        .servfail("broken.test")
        .start()
        .await
        .expect("test DNS server");
    let config = DnsConfig {
        min_ttl: Duration::from_millis(300),
        max_ttl: Duration::from_secs(60),
        ..dns.config()
    };
    let resolver = resolver(&config);

    for _ in 0..3 {
        let error = resolver
            .resolve("nowhere.test")
            .await
            .expect_err("NXDOMAIN");
        assert!(error.is_permanent());
        let error = resolver.resolve("broken.test").await.expect_err("SERVFAIL");
        assert!(!error.is_permanent());
    }
    assert_eq!(dns.queries("nowhere.test", RecordType::MX), 1);
    let servfail_queries = dns.queries("broken.test", RecordType::MX);

    // The temporary failure is kept min(5 s, min_ttl = 300 ms); the
    // NXDOMAIN for the SOA's 60 s.
    tokio::time::sleep(Duration::from_millis(350)).await;
    resolver.resolve("broken.test").await.expect_err("SERVFAIL");
    assert!(dns.queries("broken.test", RecordType::MX) > servfail_queries);
    resolver
        .resolve("nowhere.test")
        .await
        .expect_err("NXDOMAIN");
    assert_eq!(dns.queries("nowhere.test", RecordType::MX), 1);
}

#[tokio::test]
async fn concurrent_lookups_share_one_query() {
    let dns = TestDns::builder()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", V4_1)
        .start()
        .await
        .expect("test DNS server");
    let resolver = resolver(&dns.config());

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let resolver = resolver.clone();
        tasks.spawn(async move { resolver.resolve("example.test").await });
    }
    while let Some(result) = tasks.join_next().await {
        let hosts = result.expect("task").expect("MX hosts");
        assert_eq!(names(&hosts), ["mx.example.test"]);
    }
    assert_eq!(dns.queries("example.test", RecordType::MX), 1);
}

#[tokio::test]
async fn an_invalid_name_does_not_exist_and_is_not_asked() {
    let dns = TestDns::builder().start().await.expect("test DNS server");

    let error = resolver(&dns.config())
        .resolve("bad..name")
        .await
        .expect_err("invalid name");

    assert!(matches!(error, DnsError::NoSuchDomain { .. }), "{error:?}");
    assert_eq!(dns.total_queries(), 0);
}
