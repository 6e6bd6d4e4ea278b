//! List cursors and client webhook URLs: never a panic, and an accepted URL is https to a host
//! that is not an internal address.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    shared::fuzz::list_cursor(text);
    if let Ok(accepted) = shared::fuzz::webhook_url(text) {
        let url = url::Url::parse(&accepted).expect("an accepted URL parses");
        assert_eq!(url.scheme(), "https");
        assert!(url.username().is_empty() && url.password().is_none());
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => None,
            None => panic!("accepted a URL without a host: {accepted}"),
        };
        if let Some(ip) = literal {
            assert!(shared::webhooks::refuse_non_public(ip).is_ok(), "{accepted}");
        }
    }
});
