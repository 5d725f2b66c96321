//! The IO half of the webhook SSRF guard, used when a webhook is registered (command API) and again
//! before every delivery (projector). The URL is parsed once into its canonical form (WHATWG: lower
//! case, IDNA, numeric IPv4 forms such as `0x7f000001` read as addresses); that one canonical host is
//! what is resolved, checked and connected to, with the connection pinned to the checked addresses
//! (no second DNS lookup that could be rebound).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use reqwest::Url;

use domain::user::is_forbidden_address;

/// A webhook endpoint whose addresses were checked.
#[derive(Debug, Clone)]
pub struct Target {
    /// The canonical URL: send the request to exactly this.
    pub url: Url,
    /// The canonical host name when the URL names one (what `addrs` are pinned to).
    pub domain: Option<String>,
    /// Every address the host stands for, all checked.
    pub addrs: Vec<SocketAddr>,
}

impl Target {
    /// A client that connects only to the checked addresses (never resolves the host again) and
    /// follows no redirect.
    pub fn client(&self, timeout: Duration) -> reqwest::Result<reqwest::Client> {
        let mut b = reqwest::Client::builder().timeout(timeout).redirect(reqwest::redirect::Policy::none());
        if let Some(domain) = &self.domain {
            b = b.resolve_to_addrs(domain, &self.addrs);
        }
        b.build()
    }
}

/// Parses `url`, resolves its canonical host (within `timeout`) and refuses it when it does not
/// resolve or, unless `allow_private`, when any address is not public.
pub async fn resolve(url: &str, allow_private: bool, timeout: Duration) -> Result<Target, String> {
    let url = Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must use http or https".into());
    }
    let port = url.port_or_known_default().ok_or("has no port")?;
    let (domain, addrs) = match url.host() {
        Some(url::Host::Ipv4(ip)) => (None, vec![SocketAddr::new(IpAddr::V4(ip), port)]),
        Some(url::Host::Ipv6(ip)) => (None, vec![SocketAddr::new(IpAddr::V6(ip), port)]),
        Some(url::Host::Domain(name)) => {
            let name = name.to_owned();
            let addrs: Vec<SocketAddr> = tokio::time::timeout(timeout, tokio::net::lookup_host((name.as_str(), port)))
                .await
                .map_err(|_| format!("{name} could not be resolved in time"))?
                .map_err(|_| format!("{name} does not resolve"))?
                .collect();
            (Some(name), addrs)
        }
        None => return Err("must have a host".into()),
    };
    let shown = domain.clone().unwrap_or_else(|| url.host_str().unwrap_or_default().to_owned());
    if addrs.is_empty() {
        return Err(format!("{shown} does not resolve"));
    }
    if !allow_private && addrs.iter().any(|a| is_forbidden_address(a.ip())) {
        return Err(format!("{shown} is or resolves to a non-public address"));
    }
    Ok(Target { url, domain, addrs })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(3);

    #[tokio::test]
    async fn loopback_in_any_spelling_is_refused() {
        for url in [
            "http://localhost:9/hook",
            "http://LOCALHOST./hook",
            "http://127.0.0.1/hook",
            "http://0x7f000001/hook",
            "http://2130706433/hook",
            "http://0177.0.0.1/hook",
            "http://[::1]/hook",
            "http://[::127.0.0.1]/hook",
            "http://[::ffff:127.0.0.1]/hook",
            "http://[2002:7f00:1::]/hook",
            "http://[fec0::1]/hook",
        ] {
            assert!(resolve(url, false, T).await.is_err(), "{url} should be refused");
        }
    }

    #[tokio::test]
    async fn the_checked_host_is_the_canonical_one_the_client_connects_to() {
        let t = resolve("http://LocalHost:8080/x", true, T).await.unwrap();
        assert_eq!(t.domain.as_deref(), Some("localhost"));
        assert_eq!(t.url.host_str(), t.domain.as_deref(), "the pinned name is the URL's own host");
        assert!(t.addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 8080));
        let t = resolve("http://0x7f000001:9/x", true, T).await.unwrap();
        assert_eq!((t.domain, t.url.host_str()), (None, Some("127.0.0.1")));
    }

    #[tokio::test]
    async fn what_is_not_an_http_url_is_refused() {
        for url in ["ftp://example.com/", "not a url", "http:///nohost"] {
            assert!(resolve(url, true, T).await.is_err(), "{url}");
        }
    }
}
