//! The HTTP client of every STS call: the operator's outbound proxy from the usual environment
//! variables and the system's trust store plus `[sts] ca_bundle` (TLS-inspecting proxies, private
//! CAs). Only STS and the daemon's own AWS credentials use it: pods' traffic and the node's
//! metadata service are never proxied.

use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode, TlsContext, TrustStore};
use aws_smithy_http_client::{Builder, Connector};
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use hyper::http::uri::Scheme;
use hyper::Uri;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Never through a proxy: the instance metadata service and the container-credentials addresses
/// the daemon's own credential chain may ask (a proxy would be handed the node's credentials).
const ALWAYS_DIRECT: &str = "169.254.169.254,169.254.170.2,169.254.170.23,fd00:ec2::254,fd00:ec2::23";

/// The proxy for an endpoint of `scheme`: `$HTTPS_PROXY`/`$https_proxy` for https,
/// `$HTTP_PROXY`/`$http_proxy` for http, except for hosts `$NO_PROXY`/`$no_proxy` lists (a VPC
/// endpoint, typically); and the proxy's `host:port` for the log.
pub fn proxy_from_env(scheme: &Scheme) -> Result<(ProxyConfig, Option<String>), String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty()).map(|v| (name.to_string(), v));
    let names = if *scheme == Scheme::HTTPS { ["HTTPS_PROXY", "https_proxy"] } else { ["HTTP_PROXY", "http_proxy"] };
    let Some((name, url)) = names.iter().find_map(|n| env(n)) else {
        return Ok((ProxyConfig::disabled(), None));
    };
    let uri: Uri = url.trim().parse().map_err(|e| format!("${name} is not a proxy URL: {e}"))?;
    let Some(authority) = uri.authority().map(|a| a.as_str().rsplit('@').next().unwrap_or_default().to_string()) else {
        return Err(format!("${name} is not a proxy URL (http://host:port)"));
    };
    let config = match *scheme == Scheme::HTTPS {
        true => ProxyConfig::https(uri),
        false => ProxyConfig::http(uri),
    }
    .map_err(|e| format!("${name}: {e}"))?;
    let no_proxy = env("NO_PROXY").or_else(|| env("no_proxy")).map(|(_, v)| v).unwrap_or_default();
    let no_proxy = [no_proxy.as_str(), ALWAYS_DIRECT].iter().filter(|s| !s.is_empty()).cloned().collect::<Vec<_>>();
    Ok((config.no_proxy(no_proxy.join(",")), Some(format!("{authority} (${name})"))))
}

/// An HTTPS client (rustls with aws-lc, as the SDK's default) through `proxy`, trusting the
/// system's roots and the certificates of `ca_bundle` (a PEM file), which is checked here: the
/// SDK would panic on a bad one at the first call.
pub fn http_client(ca_bundle: Option<&std::path::Path>, proxy: ProxyConfig) -> Result<SharedHttpClient, String> {
    let mut trust = TrustStore::default();
    if let Some(path) = ca_bundle {
        let pem = std::fs::read(path).map_err(|e| format!("sts.ca_bundle {}: {e}", path.display()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("sts.ca_bundle {}: not PEM certificates: {e}", path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| format!("sts.ca_bundle {}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("sts.ca_bundle {}: no certificate in it", path.display()));
        }
        trust = trust.with_pem_certificate(pem);
    }
    let context = TlsContext::builder().with_trust_store(trust).build().map_err(|e| format!("TLS: {e}"))?;
    Ok(Builder::new().build_with_connector_fn(move |settings, components| {
        let mut builder = Connector::builder().proxy_config(proxy.clone());
        builder.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            builder.set_sleep_impl(components.sleep_impl());
        }
        builder.tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc)).tls_context(context.clone()).build()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_bundle_that_is_not_pem_certificates_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").expect("write");
        let e = http_client(Some(&path), ProxyConfig::disabled()).expect_err("not PEM");
        assert!(e.contains("sts.ca_bundle"), "{e}");
        let e = http_client(Some(&dir.path().join("absent.pem")), ProxyConfig::disabled()).expect_err("absent");
        assert!(e.contains("sts.ca_bundle") && e.contains("absent.pem"), "{e}");
    }
}
