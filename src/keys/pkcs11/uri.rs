//! RFC 7512 PKCS#11 URIs: the parts envelopefs uses, parsed strictly and written back.

use super::*;
use crate::error::usage;

/// An RFC 7512 PKCS#11 URI, the parts envelopefs uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    pub token: Option<String>,
    pub serial: Option<String>,
    pub slot_id: Option<u64>,
    pub object: String,
    pub pin_source: Option<String>,
    pub module_path: Option<String>,
}

pub(super) fn pct_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let bad = || usage(format!("bad percent escape in {s:?}"));
            let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| usage(format!("{s:?} is not UTF-8")))
}

impl FromStr for Pkcs11Uri {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let rest = s.strip_prefix("pkcs11:").ok_or_else(|| usage("a PKCS#11 URI starts with pkcs11:"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut uri = Pkcs11Uri::default();
        let mut object = None;
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr.split_once('=').ok_or_else(|| usage(format!("{attr:?} is not NAME=VALUE")))?;
            let v = pct_decode(v)?;
            match k {
                "token" => uri.token = Some(v),
                "serial" => uri.serial = Some(v),
                "slot-id" => {
                    uri.slot_id = Some(v.parse().map_err(|_| usage(format!("slot-id {v:?} is not a number")))?)
                }
                "object" => object = Some(v),
                // Attributes that select nothing envelopefs needs are accepted and ignored.
                "manufacturer"
                | "model"
                | "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-manufacturer"
                | "slot-description"
                | "type"
                | "id" => {}
                _ => return Err(usage(format!("unknown PKCS#11 URI attribute {k:?}"))),
            }
        }
        for q in query.split('&').filter(|a| !a.is_empty()) {
            let (k, v) = q.split_once('=').ok_or_else(|| usage(format!("{q:?} is not NAME=VALUE")))?;
            let v = pct_decode(v)?;
            match k {
                "pin-source" => uri.pin_source = Some(v),
                "module-path" => uri.module_path = Some(v),
                "pin-value" => {
                    return Err(usage(
                        "pin-value in a URI would put the PIN on disk or a command line: use pin-source or --pin-file",
                    ))
                }
                _ => {}
            }
        }
        uri.object = object.ok_or_else(|| usage("the URI must name the key: object=LABEL"))?;
        if uri.object.contains('/') {
            return Err(usage("object= must not contain '/' (envelopefs adds /vN per key version)"));
        }
        Ok(uri)
    }
}

impl Pkcs11Uri {
    /// The URI as stored in headers and config: no PIN source, no module path.
    pub fn key_id(&self) -> String {
        let mut s = String::from("pkcs11:");
        if let Some(t) = &self.token {
            s += &format!("token={};", enc(t));
        }
        if let Some(t) = &self.serial {
            s += &format!("serial={};", enc(t));
        }
        if let Some(t) = self.slot_id {
            s += &format!("slot-id={t};");
        }
        s + &format!("object={}", enc(&self.object))
    }
}

pub(super) fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
