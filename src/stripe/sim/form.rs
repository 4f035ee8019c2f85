//! Stripe's request encoding: `application/x-www-form-urlencoded` (or a GET query) with bracketed keys —
//! `metadata[k]=v`, `expand[]=x` or `expand[0]=x`, `payment_method_data[au_becs_debit][account_number]=…`.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form {
    pairs: Vec<(String, String)>,
}

/// A parameter Stripe refuses before executing anything: its 400 `invalid_request_error` with `param`, and the
/// code Stripe gives that kind of mistake (`parameter_missing`, `parameter_invalid_integer`,
/// `parameter_invalid_empty`, `parameter_unknown`; none for a value outside an enum or a metadata limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub param: String,
    pub code: Option<&'static str>,
    pub message: String,
}

impl ParamError {
    pub fn missing(param: &str) -> Self {
        Self {
            param: param.to_owned(),
            code: Some("parameter_missing"),
            message: format!("Missing required param: {param}."),
        }
    }

    fn empty(param: &str) -> Self {
        Self {
            param: param.to_owned(),
            code: Some("parameter_invalid_empty"),
            message: format!(
                "You passed an empty string for '{param}'. We assume empty values are an attempt to unset a parameter; however '{param}' cannot be unset. You should remove '{param}' from your request or supply a non-empty value."
            ),
        }
    }

    /// A value Stripe does not accept for `param` (no specific code).
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: param.to_owned(),
            code: None,
            message: message.into(),
        }
    }
}

/// Stripe's metadata limits.
pub const METADATA_KEYS_MAX: usize = 50;
pub const METADATA_KEY_CHARS_MAX: usize = 40;
pub const METADATA_VALUE_CHARS_MAX: usize = 500;

/// "a, b, or c", as Stripe lists an enum's values.
fn one_of(values: &[&str]) -> String {
    match values {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [a, b] => format!("{a} or {b}"),
        [rest @ .., last] => format!("{}, or {last}", rest.join(", ")),
    }
}

impl Form {
    pub fn parse(raw: &[u8]) -> Self {
        Self {
            pairs: form_urlencoded::parse(raw).into_owned().collect(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// A present, non-empty value; `parameter_missing` or `parameter_invalid_empty` otherwise.
    pub fn required(&self, key: &str) -> Result<&str, ParamError> {
        self.optional(key)?.ok_or_else(|| ParamError::missing(key))
    }

    /// The value if present; an empty string is `parameter_invalid_empty`, as Stripe says.
    pub fn optional(&self, key: &str) -> Result<Option<&str>, ParamError> {
        match self.get(key) {
            Some("") => Err(ParamError::empty(key)),
            other => Ok(other),
        }
    }

    pub fn int(&self, key: &str) -> Result<Option<i64>, ParamError> {
        self.optional(key)?
            .map(|v| {
                v.parse::<i64>().map_err(|_| ParamError {
                    param: key.to_owned(),
                    code: Some("parameter_invalid_integer"),
                    message: format!("Invalid integer: {v}"),
                })
            })
            .transpose()
    }

    pub fn bool(&self, key: &str) -> Result<bool, ParamError> {
        match self.optional(key)? {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(ParamError::invalid(key, format!("Invalid boolean: {other}"))),
        }
    }

    /// One of an enum's values, or Stripe's refusal naming the parameter.
    pub fn one_of(&self, key: &str, allowed: &[&str]) -> Result<Option<&str>, ParamError> {
        match self.optional(key)? {
            Some(v) if !allowed.contains(&v) => Err(ParamError::invalid(
                key,
                format!("Invalid {key}: must be one of {}", one_of(allowed)),
            )),
            other => Ok(other),
        }
    }

    /// Refuses a parameter the endpoint does not know (`parameter_unknown`), as Stripe does: `allowed` names the
    /// top-level parameters (`metadata` allows `metadata[…]`).
    pub fn only(&self, allowed: &[&str]) -> Result<(), ParamError> {
        for (key, _) in &self.pairs {
            let top = key.split('[').next().unwrap_or(key);
            if !allowed.contains(&top) && top != "expand" {
                return Err(ParamError {
                    param: key.clone(),
                    code: Some("parameter_unknown"),
                    message: format!("Received unknown parameter: {key}"),
                });
            }
        }
        Ok(())
    }

    /// `metadata[k]=v` within Stripe's limits: at most 50 keys, keys up to 40 characters, values up to 500.
    pub fn metadata(&self) -> Result<BTreeMap<String, String>, ParamError> {
        let metadata = self.map("metadata");
        if metadata.len() > METADATA_KEYS_MAX {
            return Err(ParamError::invalid(
                "metadata",
                format!("Invalid metadata: metadata cannot contain more than {METADATA_KEYS_MAX} keys."),
            ));
        }
        for (key, value) in &metadata {
            if key.chars().count() > METADATA_KEY_CHARS_MAX {
                return Err(ParamError::invalid(
                    &format!("metadata[{key}]"),
                    format!("Metadata keys can have up to {METADATA_KEY_CHARS_MAX} characters, but you passed in a key that is {} characters long.", key.chars().count()),
                ));
            }
            if value.chars().count() > METADATA_VALUE_CHARS_MAX {
                return Err(ParamError::invalid(
                    &format!("metadata[{key}]"),
                    format!("Metadata values can have up to {METADATA_VALUE_CHARS_MAX} characters, but you passed in a value that is {} characters long.", value.chars().count()),
                ));
            }
        }
        Ok(metadata)
    }

    /// `name[]=a&name[]=b` or `name[0]=a&name[1]=b`, in order.
    pub fn list(&self, name: &str) -> Vec<String> {
        let prefix = format!("{name}[");
        self.pairs
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix(&prefix)
                    .and_then(|rest| rest.strip_suffix(']'))
                    .is_some_and(|inner| inner.is_empty() || inner.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// `name[k]=v` pairs (one level).
    pub fn map(&self, name: &str) -> BTreeMap<String, String> {
        let prefix = format!("{name}[");
        self.pairs
            .iter()
            .filter_map(|(k, v)| {
                let inner = k.strip_prefix(&prefix)?.strip_suffix(']')?;
                (!inner.is_empty() && !inner.contains('[')).then(|| (inner.to_owned(), v.clone()))
            })
            .collect()
    }

    /// The parameters in a canonical order: what "the same parameters" means for idempotency.
    pub fn fingerprint(&self) -> Vec<(String, String)> {
        let mut sorted = self.pairs.clone();
        sorted.sort();
        sorted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bracketed_keys() {
        let f = Form::parse(
            b"amount=500&metadata%5Bsplit_payment_id%5D=spay_1&metadata[x]=y&expand[]=a&expand[]=b\
              &allowed_payment_method_types[0]=au_becs_debit&payment_method_data[au_becs_debit][account_number]=000123456",
        );
        assert_eq!(f.int("amount").unwrap(), Some(500));
        assert_eq!(
            f.map("metadata").into_iter().collect::<Vec<_>>(),
            vec![("split_payment_id".into(), "spay_1".into()), ("x".into(), "y".into())]
        );
        assert_eq!(f.list("expand"), vec!["a", "b"]);
        assert_eq!(f.list("allowed_payment_method_types"), vec!["au_becs_debit"]);
        assert_eq!(
            f.get("payment_method_data[au_becs_debit][account_number]"),
            Some("000123456")
        );
        assert!(f.map("payment_method_data").is_empty(), "nested keys are not one level");
        assert_eq!(f.int("x").unwrap(), None);
        let not_int = Form::parse(b"amount=5.5").int("amount").unwrap_err();
        assert_eq!(not_int.code, Some("parameter_invalid_integer"));
        let missing = Form::parse(b"").required("amount").unwrap_err();
        assert_eq!(
            (missing.param.as_str(), missing.code),
            ("amount", Some("parameter_missing"))
        );
        let empty = Form::parse(b"currency=").required("currency").unwrap_err();
        assert_eq!(empty.code, Some("parameter_invalid_empty"));
    }

    #[test]
    fn unknown_parameters_enums_and_metadata_limits() {
        let f = Form::parse(b"amount=1&metadata[a]=b&expand[]=x&colour=red");
        let unknown = f.only(&["amount", "metadata"]).unwrap_err();
        assert_eq!(
            (unknown.param.as_str(), unknown.code),
            ("colour", Some("parameter_unknown"))
        );
        assert!(Form::parse(b"amount=1&metadata[a]=b")
            .only(&["amount", "metadata"])
            .is_ok());

        let form = Form::parse(b"reason=because");
        let reason = form.one_of("reason", &["duplicate", "fraudulent"]).unwrap_err();
        assert_eq!((reason.param.as_str(), reason.code), ("reason", None));
        assert_eq!(reason.message, "Invalid reason: must be one of duplicate or fraudulent");

        let long_key = format!("metadata[{}]=v", "k".repeat(41));
        assert_eq!(Form::parse(long_key.as_bytes()).metadata().unwrap_err().code, None);
        let long_value = format!("metadata[k]={}", "v".repeat(501));
        assert!(Form::parse(long_value.as_bytes()).metadata().is_err());
        let fifty_one: Vec<String> = (0..51).map(|i| format!("metadata[k{i}]=v")).collect();
        assert!(Form::parse(fifty_one.join("&").as_bytes()).metadata().is_err());
        let fifty: Vec<String> = (0..50).map(|i| format!("metadata[k{i}]=v")).collect();
        assert_eq!(Form::parse(fifty.join("&").as_bytes()).metadata().unwrap().len(), 50);
        let at_limits = format!("metadata[{}]={}", "k".repeat(40), "v".repeat(500));
        assert!(Form::parse(at_limits.as_bytes()).metadata().is_ok());
    }

    #[test]
    fn fingerprint_ignores_order() {
        assert_eq!(
            Form::parse(b"a=1&b=2").fingerprint(),
            Form::parse(b"b=2&a=1").fingerprint()
        );
        assert_ne!(
            Form::parse(b"a=1&b=2").fingerprint(),
            Form::parse(b"a=1&b=3").fingerprint()
        );
    }
}
