//! The plugin's one error type, mapped onto the CNI spec's error codes.

use std::fmt;

use iamlink_common::intercept::InterceptError;
use iamlink_common::StoreError;
use serde::Serialize;

/// Error codes from the CNI spec; 100 and up are iamlink's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidNetConf = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    HostInterface = 100,
    PodRoutes = 101,
    Interception = 102,
    Store = 103,
    CheckFailed = 104,
}

#[derive(Debug)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

pub type Result<T> = std::result::Result<T, CniError>;

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    pub fn with_details(mut self, details: impl fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    /// The error as the spec's JSON, for stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let out = Out { cni_version, code: self.code as u32, msg: &self.msg, details: &self.details };
        serde_json::to_string(&out).unwrap_or_else(|_| format!("{{\"code\":{}}}", self.code as u32))
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.details.is_empty() {
            write!(f, "{}", self.msg)
        } else {
            write!(f, "{}: {}", self.msg, self.details)
        }
    }
}

impl From<StoreError> for CniError {
    fn from(e: StoreError) -> Self {
        let code = match e {
            StoreError::InvalidKey(_) => Code::InvalidEnv,
            StoreError::Full(_) => Code::TryAgainLater,
            _ => Code::Store,
        };
        CniError::new(code, "iamlink store").with_details(e)
    }
}

impl From<InterceptError> for CniError {
    fn from(e: InterceptError) -> Self {
        CniError::new(Code::Interception, "iamlink interception rule set").with_details(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_fields() {
        let e = CniError::new(Code::InvalidNetConf, "bad").with_details("why");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad");
        assert_eq!(v["details"], "why");
    }
}
