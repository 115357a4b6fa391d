//! Who a request belongs to: the [`Key`] type and the [`ExtractKey`] trait that layers use to
//! find it in a request.
//!
//! Every keyed decision in this crate — fairness in the queue, per-user concurrency, rate-limit
//! windows — asks an [`ExtractKey`] for the request's [`Key`]. A closure `Fn(&Req) -> K` with
//! `K: Into<Key>` is an extractor, and so are the ready-made extractors for `http::Request`:
//!
//! * [`HeaderKey`] — the value of a header such as `x-user-id`;
//! * [`ExtensionKey`] — a value an earlier middleware (say, authentication) put into the
//!   request's extensions;
//! * [`ClientIp`] — the peer address from axum's `ConnectInfo` (feature `axum`).
//!
//! # When the key is missing
//!
//! A ready-made extractor that finds no usable key (header absent, not valid UTF-8, empty or
//! longer than [`MAX_KEY_LEN`] bytes) falls back to the shared [`Key::anonymous`] key by default:
//! every such request counts against one common "anonymous" user, which keeps per-user limits
//! conservative without refusing anybody. Call `.or_reject()` to refuse such requests instead
//! with [`RejectionKind::MissingKey`] (HTTP 400 through [`crate::http::handle_error`]).
//!
//! ```
//! use http::Request;
//! use tower_llm_queue::key::{ExtractKey, HeaderKey, Key};
//!
//! let by_header = HeaderKey::new("x-user-id");
//! let req = Request::builder().header("x-user-id", "alice").body(()).unwrap();
//! assert_eq!(by_header.extract(&req).unwrap(), Key::from("alice"));
//!
//! let anonymous = Request::new(());
//! assert_eq!(by_header.extract(&anonymous).unwrap(), Key::anonymous());
//! assert!(by_header.or_reject().extract(&anonymous).is_err());
//!
//! // Any closure returning something that converts into a `Key` is an extractor too.
//! let by_len = |req: &String| req.len() as u64;
//! assert_eq!(by_len.extract(&"four".to_string()).unwrap(), Key::from(4u64));
//! ```

use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::net::IpAddr;
use std::sync::Arc;

use crate::rejected::{Rejected, RejectionKind};

/// The longest key, in bytes, that the ready-made HTTP extractors accept.
pub const MAX_KEY_LEN: usize = 256;

/// Identifies a user, a tenant, an API key or any other group of requests that share a limit.
///
/// Cheap to clone and hash. Build one from a string, any integer (the same number is the same
/// key whatever its type), sixteen bytes such as a UUID, or an IP address; the
/// [`Key::anonymous`] key stands for every request that carried no key.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key(Repr);

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Repr {
    Anonymous,
    /// Every integer from `i64::MIN` to `u64::MAX`: a number is one key, whatever its type.
    Int(u64),
    Negative(i64),
    /// Integers above `u64::MAX`, as high and low halves (8-byte aligned, unlike `u128`).
    Wide(u64, u64),
    /// Sixteen bytes, such as a UUID.
    Bytes(Sixteen),
    Text(Arc<str>),
}

/// Sixteen bytes, 8-byte aligned like the other variants' fields, so that a key moves as three
/// words whatever it holds.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(align(8))]
struct Sixteen([u8; 16]);

impl Key {
    /// The key shared by all requests that carry none.
    pub const fn anonymous() -> Self {
        Key(Repr::Anonymous)
    }

    /// Whether this is the [`Key::anonymous`] key.
    #[inline]
    pub fn is_anonymous(&self) -> bool {
        matches!(self.0, Repr::Anonymous)
    }

    /// A name for the key in a shared store, distinct for every key (the text `"5"` and the
    /// number 5 differ, and no text is the anonymous key).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn storage_name(&self) -> String {
        match &self.0 {
            Repr::Anonymous => "a".to_string(),
            Repr::Int(_) | Repr::Negative(_) | Repr::Wide(..) => format!("i:{self}"),
            Repr::Bytes(_) => format!("b:{self}"),
            Repr::Text(s) => format!("s:{s}"),
        }
    }
}

fn write_uuid(f: &mut fmt::Formatter<'_>, bytes: &[u8; 16]) -> fmt::Result {
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            f.write_str("-")?;
        }
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// An integer key, the common case, is hashed as one word; the other kinds add a tag first.
/// Keys of different kinds never compare equal, so a shared hash costs nothing but a probe.
impl Hash for Key {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        match &self.0 {
            Repr::Int(n) => state.write_u64(*n),
            Repr::Anonymous => state.write_u8(0),
            Repr::Negative(n) => {
                state.write_u8(1);
                state.write_i64(*n);
            }
            Repr::Wide(high, low) => {
                state.write_u8(2);
                state.write_u64(*high);
                state.write_u64(*low);
            }
            Repr::Bytes(bytes) => {
                state.write_u8(3);
                state.write(&bytes.0);
            }
            Repr::Text(text) => {
                state.write_u8(4);
                text.hash(state);
            }
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Anonymous => f.write_str("anonymous"),
            Repr::Int(n) => write!(f, "{n}"),
            Repr::Negative(n) => write!(f, "{n}"),
            Repr::Wide(high, low) => write!(f, "{}", (u128::from(*high) << 64) | u128::from(*low)),
            Repr::Bytes(bytes) => write_uuid(f, &bytes.0),
            Repr::Text(s) => f.write_str(s),
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Anonymous => f.write_str("Key(anonymous)"),
            Repr::Text(s) => write!(f, "Key({s:?})"),
            _ => write!(f, "Key({self})"),
        }
    }
}

impl serde::Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Self {
        Key(Repr::Text(Arc::from(s)))
    }
}

impl From<String> for Key {
    fn from(s: String) -> Self {
        Key(Repr::Text(Arc::from(s)))
    }
}

impl From<Arc<str>> for Key {
    fn from(s: Arc<str>) -> Self {
        Key(Repr::Text(s))
    }
}

impl From<&String> for Key {
    fn from(s: &String) -> Self {
        Key::from(s.as_str())
    }
}

macro_rules! key_from_unsigned {
    ($($t:ty),*) => {$(
        impl From<$t> for Key {
            fn from(n: $t) -> Self {
                Key(Repr::Int(n as u64))
            }
        }
    )*};
}
key_from_unsigned!(u8, u16, u32, u64, usize);

macro_rules! key_from_signed {
    ($($t:ty),*) => {$(
        impl From<$t> for Key {
            fn from(n: $t) -> Self {
                match u64::try_from(n) {
                    Ok(n) => Key(Repr::Int(n)),
                    Err(_) => Key(Repr::Negative(n as i64)),
                }
            }
        }
    )*};
}
key_from_signed!(i8, i16, i32, i64, isize);

impl From<u128> for Key {
    fn from(n: u128) -> Self {
        match u64::try_from(n) {
            Ok(n) => Key(Repr::Int(n)),
            Err(_) => Key(Repr::Wide((n >> 64) as u64, n as u64)),
        }
    }
}

impl From<i128> for Key {
    fn from(n: i128) -> Self {
        match (u128::try_from(n), i64::try_from(n)) {
            (Ok(n), _) => Key::from(n),
            (Err(_), Ok(n)) => Key::from(n),
            (Err(_), Err(_)) => Key::from(n.to_string()),
        }
    }
}

/// Sixteen bytes — a UUID's (`Uuid::into_bytes()`), a hash — shown as a hyphenated UUID.
impl From<[u8; 16]> for Key {
    fn from(bytes: [u8; 16]) -> Self {
        Key(Repr::Bytes(Sixteen(bytes)))
    }
}

impl From<IpAddr> for Key {
    fn from(ip: IpAddr) -> Self {
        Key::from(ip.to_string())
    }
}

impl From<()> for Key {
    fn from(_: ()) -> Self {
        Key::anonymous()
    }
}

/// Finds the [`Key`] of a request.
///
/// Implemented by every `Fn(&Req) -> K` where `K: Into<Key>`, and by the ready-made extractors
/// of this module. Implement it yourself to refuse some requests with a [`Rejected`].
///
/// The key is returned owned, not borrowed from the request, because it outlives the request:
/// the layer keeps it in its shared state (a user's slots, a fair-queuing turn, a rate window)
/// while the request itself has moved on to the inner service. That costs little: integers,
/// UUIDs and [`Key::anonymous`] are stored inline, and text is one shared `Arc<str>` — return
/// an `Arc<str>` you already hold, and cloning it is a reference count.
pub trait ExtractKey<Req> {
    /// The request's key, or the reason it has none and must be refused.
    fn extract(&self, req: &Req) -> Result<Key, Rejected>;
}

impl<F, Req, K> ExtractKey<Req> for F
where
    F: Fn(&Req) -> K,
    K: Into<Key>,
{
    fn extract(&self, req: &Req) -> Result<Key, Rejected> {
        Ok(self(req).into())
    }
}

/// What a ready-made extractor does when the request carries no usable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenMissing {
    /// Use the shared [`Key::anonymous`] key (the default).
    #[default]
    Anonymous,
    /// Refuse the request with [`RejectionKind::MissingKey`].
    Reject,
}

impl WhenMissing {
    fn apply(self, found: Option<Key>, what: &dyn fmt::Display) -> Result<Key, Rejected> {
        match (found, self) {
            (Some(key), _) => Ok(key),
            (None, WhenMissing::Anonymous) => Ok(Key::anonymous()),
            (None, WhenMissing::Reject) => Err(Rejected::new(RejectionKind::MissingKey)
                .with_message(format!("{what} is missing or malformed"))),
        }
    }
}

fn usable_text(s: &str) -> Option<Key> {
    let s = s.trim();
    (!s.is_empty() && s.len() <= MAX_KEY_LEN).then(|| Key::from(s))
}

/// Takes the key from a request header, such as `x-user-id`.
///
/// The value is trimmed; an absent, empty, non-UTF-8 or over-long ([`MAX_KEY_LEN`]) value counts
/// as missing (see [`WhenMissing`]).
#[derive(Debug, Clone)]
pub struct HeaderKey {
    name: http::HeaderName,
    when_missing: WhenMissing,
}

impl HeaderKey {
    /// Reads the header `name`.
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header name; this is a programming error caught at start-up.
    pub fn new(name: &str) -> Self {
        let name = http::HeaderName::try_from(name)
            .unwrap_or_else(|_| panic!("{name:?} is not a valid header name"));
        HeaderKey {
            name,
            when_missing: WhenMissing::Anonymous,
        }
    }

    /// Refuses requests without a usable header with [`RejectionKind::MissingKey`].
    pub fn or_reject(mut self) -> Self {
        self.when_missing = WhenMissing::Reject;
        self
    }

    /// Counts requests without a usable header against [`Key::anonymous`] (the default).
    pub fn or_anonymous(mut self) -> Self {
        self.when_missing = WhenMissing::Anonymous;
        self
    }
}

impl<B> ExtractKey<http::Request<B>> for HeaderKey {
    fn extract(&self, req: &http::Request<B>) -> Result<Key, Rejected> {
        let found = req
            .headers()
            .get(&self.name)
            .and_then(|v| v.to_str().ok())
            .and_then(usable_text);
        self.when_missing
            .apply(found, &format_args!("header {}", self.name))
    }
}

/// Takes the key from a value of type `T` in the request's extensions, typically put there by an
/// authentication middleware that runs before the limits.
pub struct ExtensionKey<T> {
    when_missing: WhenMissing,
    _type: PhantomData<fn() -> T>,
}

impl<T> ExtensionKey<T> {
    /// Reads the extension of type `T`.
    pub fn new() -> Self {
        ExtensionKey {
            when_missing: WhenMissing::Anonymous,
            _type: PhantomData,
        }
    }

    /// Refuses requests without the extension with [`RejectionKind::MissingKey`].
    pub fn or_reject(mut self) -> Self {
        self.when_missing = WhenMissing::Reject;
        self
    }

    /// Counts requests without the extension against [`Key::anonymous`] (the default).
    pub fn or_anonymous(mut self) -> Self {
        self.when_missing = WhenMissing::Anonymous;
        self
    }
}

impl<T> Default for ExtensionKey<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for ExtensionKey<T> {
    fn clone(&self) -> Self {
        ExtensionKey {
            when_missing: self.when_missing,
            _type: PhantomData,
        }
    }
}

impl<T> fmt::Debug for ExtensionKey<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtensionKey")
            .field("type", &std::any::type_name::<T>())
            .field("when_missing", &self.when_missing)
            .finish()
    }
}

impl<B, T> ExtractKey<http::Request<B>> for ExtensionKey<T>
where
    T: Clone + Into<Key> + Send + Sync + 'static,
{
    fn extract(&self, req: &http::Request<B>) -> Result<Key, Rejected> {
        let found = req.extensions().get::<T>().cloned().map(Into::into);
        self.when_missing.apply(
            found,
            &format_args!("extension {}", std::any::type_name::<T>()),
        )
    }
}

/// Takes the key from the client's IP address, as recorded by axum's
/// `into_make_service_with_connect_info::<SocketAddr>()` in a `ConnectInfo` extension.
///
/// Behind a reverse proxy the peer is the proxy: put the forwarded address into an extension
/// with a trusted middleware and use [`ExtensionKey`] instead.
#[cfg(feature = "axum")]
#[derive(Debug, Clone, Default)]
pub struct ClientIp {
    when_missing: WhenMissing,
}

#[cfg(feature = "axum")]
impl ClientIp {
    /// Reads the peer address from `ConnectInfo<SocketAddr>`.
    pub fn new() -> Self {
        ClientIp::default()
    }

    /// Refuses requests without connection info with [`RejectionKind::MissingKey`].
    pub fn or_reject(mut self) -> Self {
        self.when_missing = WhenMissing::Reject;
        self
    }

    /// Counts requests without connection info against [`Key::anonymous`] (the default).
    pub fn or_anonymous(mut self) -> Self {
        self.when_missing = WhenMissing::Anonymous;
        self
    }
}

#[cfg(feature = "axum")]
impl<B> ExtractKey<http::Request<B>> for ClientIp {
    fn extract(&self, req: &http::Request<B>) -> Result<Key, Rejected> {
        let found = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| Key::from(info.0.ip()));
        self.when_missing.apply(found, &"the client address")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    #[test]
    fn header_values_are_trimmed_and_bounded() {
        let x = HeaderKey::new("x-user-id").or_reject();
        let req = Request::builder()
            .header("x-user-id", "  bob ")
            .body(())
            .unwrap();
        assert_eq!(x.extract(&req).unwrap(), Key::from("bob"));

        let long = "a".repeat(MAX_KEY_LEN + 1);
        let req = Request::builder()
            .header("x-user-id", long.as_str())
            .body(())
            .unwrap();
        let err = x.extract(&req).unwrap_err();
        assert_eq!(err.kind(), RejectionKind::MissingKey);
        assert_eq!(err.message(), "header x-user-id is missing or malformed");
    }

    #[test]
    fn non_utf8_header_is_missing() {
        let mut req = Request::new(());
        req.headers_mut().insert(
            "x-user-id",
            http::HeaderValue::from_bytes(&[0xff, 0xfe]).unwrap(),
        );
        assert_eq!(
            HeaderKey::new("x-user-id").extract(&req).unwrap(),
            Key::anonymous()
        );
    }

    #[test]
    fn extension_key() {
        #[derive(Clone)]
        struct UserId(u64);
        impl From<UserId> for Key {
            fn from(u: UserId) -> Key {
                Key::from(u.0)
            }
        }
        let mut req = Request::new(());
        req.extensions_mut().insert(UserId(7));
        let x = ExtensionKey::<UserId>::new().or_reject();
        assert_eq!(x.extract(&req).unwrap(), Key::from(7u64));
        assert!(x.extract(&Request::new(())).is_err());
    }

    #[cfg(feature = "axum")]
    #[test]
    fn client_ip() {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                [10, 0, 0, 1],
                4000,
            ))));
        assert_eq!(
            ClientIp::new().extract(&req).unwrap(),
            Key::from("10.0.0.1")
        );
        assert_eq!(
            ClientIp::new().extract(&Request::new(())).unwrap(),
            Key::anonymous()
        );
    }

    #[test]
    fn numbers_are_one_key_whatever_their_type() {
        assert_eq!(Key::from(5i32), Key::from(5u8));
        assert_eq!(Key::from(5u128), Key::from(5u64));
        assert_eq!(Key::from(-5i64), Key::from(-5i8));
        assert_ne!(Key::from(-1i64), Key::from(u64::MAX));
        assert_eq!(Key::from(-1i64).to_string(), "-1");
        assert_eq!(Key::from(u128::MAX).to_string(), u128::MAX.to_string());
        assert_ne!(Key::from(u128::MAX), Key::from(u64::MAX));
        assert_eq!(Key::from(i128::MIN).to_string(), i128::MIN.to_string());
        let uuid = [
            0x67, 0xe5, 0x50, 0x44, 0x10, 0xb1, 0x42, 0x6f, 0x92, 0x47, 0xbb, 0x68, 0x0e, 0x5f,
            0xe0, 0xc8,
        ];
        assert_eq!(
            Key::from(uuid).to_string(),
            "67e55044-10b1-426f-9247-bb680e5fe0c8"
        );
        assert_ne!(
            Key::from(uuid).storage_name(),
            Key::from(uuid.map(|_| 0)).storage_name()
        );
        assert_ne!(
            Key::from(-5i64).storage_name(),
            Key::from("-5").storage_name()
        );
        assert!(std::mem::size_of::<Key>() <= 24);
    }

    #[test]
    fn keys_display_and_serialize() {
        assert_eq!(Key::from(5u32).to_string(), "5");
        assert_eq!(Key::anonymous().to_string(), "anonymous");
        assert_eq!(
            serde_json::to_string(&Key::from("a\"b")).unwrap(),
            r#""a\"b""#
        );
        assert_ne!(Key::from("5"), Key::from(5u64));
    }
}
