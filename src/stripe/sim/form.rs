//! Stripe's request encoding: `application/x-www-form-urlencoded` (or a GET query) with bracketed keys —
//! `metadata[k]=v`, `expand[]=x` or `expand[0]=x`, `payment_method_data[au_becs_debit][account_number]=…`.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form {
    pairs: Vec<(String, String)>,
}

/// A parameter that is present but not acceptable: Stripe's 400 with `param`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub param: String,
    pub message: String,
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

    pub fn required(&self, key: &str) -> Result<&str, ParamError> {
        self.get(key).filter(|v| !v.is_empty()).ok_or_else(|| ParamError {
            param: key.to_owned(),
            message: format!("Missing required param: {key}."),
        })
    }

    pub fn int(&self, key: &str) -> Result<Option<i64>, ParamError> {
        self.get(key)
            .map(|v| {
                v.parse::<i64>().map_err(|_| ParamError {
                    param: key.to_owned(),
                    message: format!("Invalid integer: {v}"),
                })
            })
            .transpose()
    }

    pub fn bool(&self, key: &str) -> Result<bool, ParamError> {
        match self.get(key) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(ParamError {
                param: key.to_owned(),
                message: format!("Invalid boolean: {other}"),
            }),
        }
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
        assert!(Form::parse(b"amount=5.5").int("amount").is_err());
        assert_eq!(Form::parse(b"").required("amount").unwrap_err().param, "amount");
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
