//! Serde for KVM structs as their exact bytes. kvm-bindings' `serde` feature writes a struct as
//! its bytes but reads back any length, zero-filling or cutting; saved state is untrusted, so a
//! wrong length is refused here instead (`#[serde(with = "kvm_bytes")]`).

use serde::de::{DeserializeOwned, Error};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Writes `value` as kvm-bindings does: its bytes.
pub fn serialize<T: Serialize, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    value.serialize(serializer)
}

/// Reads the bytes of a `T`, exactly `size_of::<T>()` of them.
pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<T, D::Error> {
    let bytes = Vec::<u8>::deserialize(deserializer)?;
    let expected = std::mem::size_of::<T>();
    if bytes.len() != expected {
        return Err(D::Error::custom(format!(
            "{} bytes for a {expected}-byte {}",
            bytes.len(),
            std::any::type_name::<T>()
                .rsplit("::")
                .next()
                .unwrap_or("struct")
        )));
    }
    T::deserialize(serde::de::value::BytesDeserializer::<D::Error>::new(&bytes))
}
