//! Pure types and rules of splitpay: no I/O, no clock, no database. Everything here is unit- and property-tested.
//!
//! - [`money`]: `Money` and `Currency` in integer minor units, with Stripe's minimum and maximum charges.
//! - [`plan`]: allocation modes (FIXED, SUGGESTED, OPEN), payment method types, and the `SplitPlan` a donor's
//!   submission becomes.
//! - [`fees`]: the fee split by largest remainder, and the donor-covers-fees gross-up.
//! - [`state`]: the state machines of a split payment, a split allocation and a donation.
//! - [`refund_split`]: a refund spread over allocations by largest remainder, and how each part is covered.
//! - [`ids`]: prefixed random identifiers and the idempotency keys derived from them.

pub mod fees;
pub mod ids;
pub mod money;
pub mod plan;
pub mod refund_split;
pub mod state;

/// A stored or received string that names no variant of a closed enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{value}' is not a valid {what}")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
}

/// A closed enum whose variants have one exact spelling (the database's and the wire's), with `ALL`, `as_str`,
/// `parse`, `Display` and `TryFrom<String>`.
macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(raw: &str) -> Option<Self> {
                match raw { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        /// For decoding database columns (sqlx `try_from = "String"`).
        impl TryFrom<String> for $name {
            type Error = $crate::domain::UnknownValue;

            fn try_from(raw: String) -> Result<Self, Self::Error> {
                Self::parse(&raw).ok_or($crate::domain::UnknownValue { what: stringify!($name), value: raw })
            }
        }
    };
}
pub(crate) use string_enum;
