//! The operator's certificate authority: it signs the operator's server certificate and the
//! gateways' client certificates, and names who a verified peer certificate belongs to.
//!
//! The CA's key is a secret: it leaves this module only as PEM for the Secret that keeps it,
//! and is never logged (`Debug` prints the certificate's subject only).

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    SanType, SerialNumber,
};
use time::OffsetDateTime;

/// The subject common name of the certificates the operator replicas present, to gateways as
/// servers and to each other as `ControlPeer` clients. No gateway id can take this form: a
/// gateway id always has three `/`-separated parts.
pub const OPERATOR_COMMON_NAME: &str = "blockgate-operator";

/// The CA certificate's subject common name.
const CA_COMMON_NAME: &str = "blockgate control CA";

/// Certificates are valid from a little before they are issued, so a peer whose clock is
/// slightly behind accepts them at once.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot generate a key pair")]
    GenerateKey(#[source] rcgen::Error),
    #[error("cannot sign a certificate")]
    Sign(#[source] rcgen::Error),
    #[error("cannot parse the CA's key")]
    ParseKey(#[source] rcgen::Error),
    #[error("cannot parse the CA's certificate")]
    ParseCertificate(#[source] rcgen::Error),
    #[error("the certificate request is malformed or its signature does not verify")]
    ParseRequest(#[source] rcgen::Error),
    #[error("the certificate request's key is not ECDSA P-256")]
    RequestKeyAlgorithm,
    #[error("invalid subject alternative name {name:?}")]
    SubjectAlternativeName {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("validity period out of range")]
    Validity,
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCertificate {
    pub certificate_pem: String,
    /// Secret: never log it.
    pub key_pem: String,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("IssuedCertificate")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A gateway certificate signed from a certificate request (the key stays with the gateway).
#[derive(Debug, Clone)]
pub struct SignedCertificate {
    pub certificate_pem: String,
    pub not_after: SystemTime,
}

/// The operator's CA (ECDSA P-256).
pub struct CertificateAuthority {
    certificate_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("CertificateAuthority")
            .field("subject", &CA_COMMON_NAME)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA, valid for `validity`.
    pub fn create(validity: Duration) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::GenerateKey)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, CA_COMMON_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, validity)?;
        params.serial_number = Some(random_serial());
        let certificate = params.self_signed(&key).map_err(CaError::Sign)?;
        let certificate_pem = certificate.pem();
        let key_pem = key.serialize_pem();
        Ok(CertificateAuthority {
            certificate_pem,
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA saved with [`CertificateAuthority::to_pem`].
    pub fn from_pem(certificate_pem: &str, key_pem: &str) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(CaError::ParseKey)?;
        let issuer =
            Issuer::from_ca_cert_pem(certificate_pem, key).map_err(CaError::ParseCertificate)?;
        Ok(CertificateAuthority {
            certificate_pem: certificate_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// The certificate and the key (a secret), as PEM: `(certificate, key)`.
    pub fn to_pem(&self) -> (String, String) {
        (self.certificate_pem.clone(), self.key_pem.clone())
    }

    /// The CA certificate, the trust anchor gateways and replicas verify against.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// The operator's certificate: a server certificate for `names` (DNS names or IP
    /// addresses) that also serves as its client certificate towards the other replicas.
    pub fn issue_operator_certificate(
        &self,
        names: &[String],
        validity: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::GenerateKey)?;
        let mut params = leaf_params(OPERATOR_COMMON_NAME, validity)?;
        params.subject_alt_names = names
            .iter()
            .map(|name| subject_alt_name(name))
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let certificate = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Sign)?;
        Ok(IssuedCertificate {
            certificate_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
            not_after: system_time(params.not_after),
        })
    }

    /// A gateway's client certificate with a new key pair made here, as activation would
    /// give it but without a request from the gateway: for tests and tools that act as a
    /// gateway (a gateway itself keeps its key and sends a request).
    pub fn issue_gateway_certificate(
        &self,
        gateway_id: &str,
        validity: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::GenerateKey)?;
        let mut params = leaf_params(gateway_id, validity)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let certificate = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Sign)?;
        Ok(IssuedCertificate {
            certificate_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
            not_after: system_time(params.not_after),
        })
    }

    /// Signs a gateway's certificate request: the certificate carries the request's public key
    /// and nothing else from it; its subject is `gateway_id`, and it is good for client
    /// authentication only.
    pub fn sign_gateway_request(
        &self,
        csr_pem: &str,
        gateway_id: &str,
        validity: Duration,
    ) -> Result<SignedCertificate, CaError> {
        let request =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::ParseRequest)?;
        if request.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::RequestKeyAlgorithm);
        }
        let mut params = leaf_params(gateway_id, validity)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let certificate = params
            .signed_by(&request.public_key, &self.issuer)
            .map_err(CaError::Sign)?;
        Ok(SignedCertificate {
            certificate_pem: certificate.pem(),
            not_after: system_time(params.not_after),
        })
    }
}

fn leaf_params(common_name: &str, validity: Duration) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    set_validity(&mut params, validity)?;
    Ok(params)
}

fn subject_alt_name(name: &str) -> Result<SanType, CaError> {
    if let Ok(address) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(address));
    }
    let dns = name
        .to_string()
        .try_into()
        .map_err(|source| CaError::SubjectAlternativeName {
            name: name.to_string(),
            source,
        })?;
    Ok(SanType::DnsName(dns))
}

fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), CaError> {
    let now = OffsetDateTime::now_utc();
    params.not_before = now
        .checked_sub(time::Duration::try_from(BACKDATE).map_err(|_| CaError::Validity)?)
        .ok_or(CaError::Validity)?;
    params.not_after = now
        .checked_add(time::Duration::try_from(validity).map_err(|_| CaError::Validity)?)
        .ok_or(CaError::Validity)?;
    Ok(())
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive integer.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn system_time(at: OffsetDateTime) -> SystemTime {
    u64::try_from(at.unix_timestamp())
        .map(|seconds| UNIX_EPOCH + Duration::from_secs(seconds))
        .unwrap_or(UNIX_EPOCH)
}

/// The subject common name of a DER certificate (one the TLS layer has verified already).
pub fn common_name(certificate_der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(certificate_der).ok()?;
    let name = certificate
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(name)
}

/// A gateway's identity: `<namespace>/<storage-gateway>/<node>`, the subject of its
/// certificate. Kubernetes names hold no `/`, so the three parts are unambiguous.
pub fn gateway_id(storage_gateway: &str, node: &str) -> Result<String, InvalidName> {
    let (namespace, name) = storage_gateway
        .split_once('/')
        .ok_or_else(|| InvalidName(storage_gateway.to_string()))?;
    for part in [namespace, name, node] {
        if !is_kubernetes_name(part) {
            return Err(InvalidName(part.to_string()));
        }
    }
    Ok(format!("{namespace}/{name}/{node}"))
}

/// Whether `id` has the form of a gateway id.
pub fn is_gateway_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 3 && parts.iter().all(|part| is_kubernetes_name(part))
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a Kubernetes name (lowercase letters, digits, '-' and '.', at most 253)")]
pub struct InvalidName(pub String);

fn is_kubernetes_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_signed_request_names_the_gateway_and_survives_a_reload() {
        let ca = CertificateAuthority::create(DAY * 365).unwrap();
        let (certificate, key) = ca.to_pem();
        let reloaded = CertificateAuthority::from_pem(&certificate, &key).unwrap();

        let gateway_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let request = CertificateParams::default()
            .serialize_request(&gateway_key)
            .unwrap()
            .pem()
            .unwrap();
        let signed = reloaded
            .sign_gateway_request(&request, "ns/sg/node-1", DAY)
            .unwrap();
        let der = pem_der(&signed.certificate_pem);
        assert_eq!(common_name(&der).as_deref(), Some("ns/sg/node-1"));
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            parsed
                .issuer()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            CA_COMMON_NAME
        );
        assert!(signed.not_after > SystemTime::now() + DAY - Duration::from_secs(60));
    }

    #[test]
    fn a_tampered_request_is_refused() {
        let ca = CertificateAuthority::create(DAY).unwrap();
        assert!(matches!(
            ca.sign_gateway_request("not a request", "ns/sg/n", DAY),
            Err(CaError::ParseRequest(_))
        ));
    }

    #[test]
    fn gateway_ids_are_three_kubernetes_names() {
        assert_eq!(gateway_id("ns/sg", "node-1").unwrap(), "ns/sg/node-1");
        assert!(gateway_id("sg", "node").is_err());
        assert!(gateway_id("ns/sg", "Node").is_err());
        assert!(gateway_id("ns/sg/x", "node").is_err());
        assert!(is_gateway_id("a/b/c"));
        assert!(!is_gateway_id(OPERATOR_COMMON_NAME));
        assert!(!is_gateway_id("a/b"));
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        parsed.contents
    }
}
