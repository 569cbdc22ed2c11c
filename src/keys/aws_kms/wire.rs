//! What crosses the wire to KMS: encryption contexts, the intermediate-key envelope,
//! multi-Region key ids, and SDK failures as errnos.

use super::*;

pub(super) fn ik_context(volume_id: &VolumeId, ik_id: &[u8; 16]) -> HashMap<String, String> {
    HashMap::from([
        ("envelopefs:volume".to_owned(), hex::encode(volume_id)),
        ("envelopefs:intermediate-key".to_owned(), hex::encode(ik_id)),
    ])
}

pub(super) fn ik_aad(volume_id: &VolumeId, file_id: &FileId, ik_id: &[u8; 16]) -> Vec<u8> {
    let mut aad = b"envelopefs kms intermediate wrap v1".to_vec();
    aad.extend_from_slice(volume_id);
    aad.extend_from_slice(file_id);
    aad.extend_from_slice(ik_id);
    aad
}

/// `EFIK ‖ ik id (16) ‖ blob length (u16) ‖ KMS blob of the IK ‖ nonce (12) ‖ DEK under IK (32) ‖ tag (16)`
pub(super) struct IkWrapped<'a> {
    pub(super) ik_id: [u8; 16],
    pub(super) blob: &'a [u8],
    pub(super) sealed: &'a [u8],
}

pub(super) fn parse_ik(w: &[u8]) -> Option<IkWrapped<'_>> {
    let rest = w.strip_prefix(IK_MAGIC)?;
    let ik_id: [u8; 16] = rest.get(..16)?.try_into().ok()?;
    let len = u16::from_le_bytes(rest.get(16..18)?.try_into().ok()?) as usize;
    let blob = rest.get(18..18 + len)?;
    let sealed = rest.get(18 + len..)?;
    (sealed.len() == 12 + 32 + 16).then_some(IkWrapped { ik_id, blob, sealed })
}

pub(super) fn build_ik(ik_id: &[u8; 16], blob: &[u8], sealed: &[u8]) -> Vec<u8> {
    let mut w = IK_MAGIC.to_vec();
    w.extend_from_slice(ik_id);
    w.extend_from_slice(&(blob.len() as u16).to_le_bytes());
    w.extend_from_slice(blob);
    w.extend_from_slice(sealed);
    w
}

/// Two ARNs of one multi-Region key (`arn:PARTITION:kms:REGION:ACCOUNT:key/mrk-…`): the
/// same but for the region. Single-Region keys are never equivalent to another ARN.
pub fn mrk_equivalent(a: &str, b: &str) -> bool {
    let parts = |arn: &str| -> Option<(String, String, String, String)> {
        let f: Vec<&str> = arn.splitn(6, ':').collect();
        match f[..] {
            ["arn", partition, "kms", region, account, resource] if resource.starts_with("key/mrk-") => {
                Some((partition.into(), region.into(), account.into(), resource.into()))
            }
            _ => None,
        }
    };
    match (parts(a), parts(b)) {
        (Some(x), Some(y)) => x.0 == y.0 && x.2 == y.2 && x.3 == y.3,
        _ => false,
    }
}

pub(super) fn context_map(volume_id: &VolumeId, file_id: &FileId) -> HashMap<String, String> {
    let ctx = KeyContext { volume_id, file_id };
    ctx.pairs().into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Map a KMS failure to an errno: refusals (the key is disabled, pending deletion, gone,
/// not ours, or the wrapped key does not belong here) are EACCES; anything else that
/// survived the retries (outage, throttling storm, timeout) is EIO.
pub(super) fn kms_error<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    e: aws_sdk_kms::error::SdkError<E>,
    what: &str,
) -> Error {
    let code = e.code().map(str::to_owned);
    let detail = match &e {
        aws_sdk_kms::error::SdkError::ServiceError(s) => {
            format!("{}: {}", s.err().code().unwrap_or("error"), s.err().message().unwrap_or(""))
        }
        other => crate::error::chain(other),
    };
    let errno = match code.as_deref() {
        Some(
            "AccessDeniedException"
            | "DisabledException"
            | "KMSInvalidStateException"
            | "NotFoundException"
            | "IncorrectKeyException"
            | "InvalidCiphertextException"
            | "KeyUnavailableException"
            | "InvalidKeyUsageException"
            | "InvalidGrantTokenException",
        ) => libc::EACCES,
        _ => libc::EIO,
    };
    let err = Error::new(errno, format!("KMS {what}: {detail}"));
    let unreachable =
        matches!(e, aws_sdk_kms::error::SdkError::DispatchFailure(_) | aws_sdk_kms::error::SdkError::TimeoutError(_));
    if unreachable {
        err.with_class(crate::error::Class::KeyStoreUnreachable)
    } else {
        err
    }
}

/// Counts every request the SDK sends to KMS (retries included): what KMS bills and
/// throttles, whatever the provider's caches and pools did.
#[derive(Debug, Default, Clone)]
pub struct RequestCounter(pub Arc<std::sync::atomic::AtomicU64>);

impl aws_sdk_kms::config::Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "envelopefs-request-counter"
    }

    fn read_before_transmit(
        &self,
        _context: &aws_sdk_kms::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _components: &aws_sdk_kms::config::RuntimeComponents,
        _cfg: &mut aws_sdk_kms::config::ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
