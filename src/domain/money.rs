//! Money in integer minor units, and the currencies splitpay accepts with Stripe's limits for each.
//!
//! Amounts are `i64` minor units (cents for AUD, yen for JPY); never floats. There is deliberately no
//! `impl Add for Money`: every sum goes through [`Money::checked_add`], which refuses a currency mismatch and
//! overflow instead of wrapping.

use std::fmt;

/// Stripe's largest amount for one charge, in minor units (8 digits), whatever the currency.
pub const STRIPE_MAX_CHARGE_MINOR: i64 = 99_999_999;

/// Stripe's zero-decimal currencies (amounts are whole units). ISK and UGX are listed by Stripe as zero-decimal
/// but must be sent ×100; splitpay does not accept them (see [`Currency`]).
pub const ZERO_DECIMAL_CODES: [&str; 16] = [
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf",
];

/// The number of decimal places of an ISO 4217 code as Stripe counts them (0 for the zero-decimal list, else 2).
/// Three-decimal currencies (BHD, KWD, …) are not accepted by splitpay, so they are not special-cased here.
pub fn minor_unit_exponent(code: &str) -> u32 {
    let lower = code.to_ascii_lowercase();
    if ZERO_DECIMAL_CODES.contains(&lower.as_str()) {
        0
    } else {
        2
    }
}

/// The currencies splitpay accepts: those whose Stripe minimum charge is published, so the minimum can be
/// enforced exactly. A closed set on purpose; adding one means adding its minimum below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Currency {
    Aud,
    Nzd,
    Usd,
    Eur,
    Gbp,
    Jpy,
    Cad,
    Chf,
    Sgd,
    Hkd,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("currency '{code}' is not supported (supported: aud, nzd, usd, eur, gbp, jpy, cad, chf, sgd, hkd)")]
pub struct UnsupportedCurrency {
    pub code: String,
}

impl Currency {
    pub const ALL: [Currency; 10] = [
        Currency::Aud,
        Currency::Nzd,
        Currency::Usd,
        Currency::Eur,
        Currency::Gbp,
        Currency::Jpy,
        Currency::Cad,
        Currency::Chf,
        Currency::Sgd,
        Currency::Hkd,
    ];

    /// Parses an ISO 4217 code in either case ("AUD" from the seed API, "aud" from Stripe).
    pub fn parse(code: &str) -> Result<Self, UnsupportedCurrency> {
        let lower = code.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|c| c.stripe_code() == lower)
            .ok_or(UnsupportedCurrency { code: code.to_owned() })
    }

    /// Stripe's spelling: lowercase.
    pub fn stripe_code(self) -> &'static str {
        match self {
            Currency::Aud => "aud",
            Currency::Nzd => "nzd",
            Currency::Usd => "usd",
            Currency::Eur => "eur",
            Currency::Gbp => "gbp",
            Currency::Jpy => "jpy",
            Currency::Cad => "cad",
            Currency::Chf => "chf",
            Currency::Sgd => "sgd",
            Currency::Hkd => "hkd",
        }
    }

    /// The seed API's spelling: uppercase ("AUD").
    pub fn iso_code(self) -> String {
        self.stripe_code().to_ascii_uppercase()
    }

    pub fn exponent(self) -> u32 {
        minor_unit_exponent(self.stripe_code())
    }

    /// Stripe's minimum charge amount in minor units (Stripe docs, "Minimum and maximum charge amounts").
    pub fn min_charge_minor(self) -> i64 {
        match self {
            Currency::Aud | Currency::Nzd | Currency::Usd | Currency::Eur => 50,
            Currency::Cad | Currency::Chf | Currency::Sgd => 50,
            Currency::Gbp => 30,
            Currency::Jpy => 50,
            Currency::Hkd => 400,
        }
    }

    pub fn max_charge_minor(self) -> i64 {
        STRIPE_MAX_CHARGE_MINOR
    }
}

impl TryFrom<String> for Currency {
    type Error = UnsupportedCurrency;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Currency::parse(&raw)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.iso_code())
    }
}

/// A non-negative amount of one currency, in minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    minor: i64,
    currency: Currency,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount must not be negative (got {0})")]
    Negative(i64),
    #[error("cannot combine {0} with {1}")]
    CurrencyMismatch(Currency, Currency),
    #[error("amount overflows")]
    Overflow,
}

impl Money {
    pub fn new(minor: i64, currency: Currency) -> Result<Self, MoneyError> {
        if minor < 0 {
            return Err(MoneyError::Negative(minor));
        }
        Ok(Self { minor, currency })
    }

    pub fn zero(currency: Currency) -> Self {
        Self { minor: 0, currency }
    }

    pub fn minor(self) -> i64 {
        self.minor
    }

    pub fn currency(self) -> Currency {
        self.currency
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch(self.currency, other.currency));
        }
        let minor = self.minor.checked_add(other.minor).ok_or(MoneyError::Overflow)?;
        Ok(Money {
            minor,
            currency: self.currency,
        })
    }

    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch(self.currency, other.currency));
        }
        let minor = self.minor.checked_sub(other.minor).ok_or(MoneyError::Overflow)?;
        Money::new(minor, self.currency)
    }
}

impl fmt::Display for Money {
    /// `12.34 AUD`, `500 JPY`: exact, from integers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exp = self.currency.exponent();
        if exp == 0 {
            return write!(f, "{} {}", self.minor, self.currency);
        }
        let scale = 10i64.pow(exp);
        write!(
            f,
            "{}.{:0width$} {}",
            self.minor / scale,
            self.minor % scale,
            self.currency,
            width = exp as usize
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currency_parses_either_case_and_refuses_unknown() {
        assert_eq!(Currency::parse("AUD").unwrap(), Currency::Aud);
        assert_eq!(Currency::parse("aud").unwrap(), Currency::Aud);
        assert_eq!(Currency::parse("jpy").unwrap().exponent(), 0);
        let err = Currency::parse("xyz").unwrap_err();
        assert!(err.to_string().contains("'xyz'"));
        assert!(
            Currency::parse("ISK").is_err(),
            "ISK needs Stripe's x100 rule; not accepted"
        );
    }

    #[test]
    fn exponents_follow_stripe_zero_decimal_list() {
        for code in ZERO_DECIMAL_CODES {
            assert_eq!(minor_unit_exponent(code), 0, "{code}");
            assert_eq!(minor_unit_exponent(&code.to_uppercase()), 0, "{code}");
        }
        for code in ["aud", "usd", "eur", "gbp", "nzd"] {
            assert_eq!(minor_unit_exponent(code), 2, "{code}");
        }
    }

    #[test]
    fn minimum_and_maximum_charges() {
        let table = [
            (Currency::Aud, 50),
            (Currency::Nzd, 50),
            (Currency::Usd, 50),
            (Currency::Eur, 50),
            (Currency::Gbp, 30),
            (Currency::Jpy, 50),
        ];
        for (currency, min) in table {
            assert_eq!(currency.min_charge_minor(), min, "{currency}");
            assert_eq!(currency.max_charge_minor(), 99_999_999, "{currency}");
        }
    }

    #[test]
    fn money_refuses_negative_mismatch_and_overflow() {
        assert_eq!(Money::new(-1, Currency::Aud), Err(MoneyError::Negative(-1)));
        let aud = Money::new(100, Currency::Aud).unwrap();
        let usd = Money::new(100, Currency::Usd).unwrap();
        assert_eq!(
            aud.checked_add(usd),
            Err(MoneyError::CurrencyMismatch(Currency::Aud, Currency::Usd))
        );
        let big = Money::new(i64::MAX, Currency::Aud).unwrap();
        assert_eq!(big.checked_add(aud), Err(MoneyError::Overflow));
        assert_eq!(
            aud.checked_sub(Money::new(101, Currency::Aud).unwrap()),
            Err(MoneyError::Negative(-1))
        );
        assert_eq!(aud.checked_add(aud).unwrap().minor(), 200);
    }

    #[test]
    fn display_is_exact() {
        assert_eq!(Money::new(1234, Currency::Aud).unwrap().to_string(), "12.34 AUD");
        assert_eq!(Money::new(5, Currency::Aud).unwrap().to_string(), "0.05 AUD");
        assert_eq!(Money::new(500, Currency::Jpy).unwrap().to_string(), "500 JPY");
    }
}
