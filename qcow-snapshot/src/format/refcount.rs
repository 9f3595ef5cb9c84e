//! Refcount-block entries of every width (1 to 64 bits).

use super::*;

/// Reads refcount entry `index` of a refcount block of width `1 << order` bits.
/// Returns `None` if the index is outside the buffer or the order is invalid.
pub fn refcount_get(block: &[u8], order: u32, index: u64) -> Option<u64> {
    if order > MAX_REFCOUNT_ORDER {
        return None;
    }
    let bits = 1u64 << order;
    let bit = index.checked_mul(bits)?;
    let byte = usize::try_from(bit / 8).ok()?;
    if bits < 8 {
        let b = *block.get(byte)?;
        let shift = (bit % 8) as u32;
        let mask = ((1u16 << bits) - 1) as u8;
        Some(u64::from((b >> shift) & mask))
    } else {
        let n = (bits / 8) as usize;
        let s = block.get(byte..byte.checked_add(n)?)?;
        Some(s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }
}

/// A refcount value does not fit the entry width, or the index is outside the block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot store refcount {value} at index {index} with refcount order {order}")]
pub struct SetRefcountError {
    /// The value that was to be stored.
    pub value: u64,
    /// Entry index.
    pub index: u64,
    /// Refcount order.
    pub order: u32,
}

/// Stores refcount entry `index` in a refcount block of width `1 << order` bits.
pub fn refcount_set(
    block: &mut [u8],
    order: u32,
    index: u64,
    value: u64,
) -> Result<(), SetRefcountError> {
    let err = SetRefcountError {
        value,
        index,
        order,
    };
    if order > MAX_REFCOUNT_ORDER {
        return Err(err);
    }
    let bits = 1u64 << order;
    if bits < 64 && value >> bits != 0 {
        return Err(err);
    }
    let bit = index.checked_mul(bits).ok_or(err.clone())?;
    let byte = usize::try_from(bit / 8).map_err(|_| err.clone())?;
    if bits < 8 {
        let b = block.get_mut(byte).ok_or(err)?;
        let shift = (bit % 8) as u32;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        *b = (*b & !mask) | (((value as u8) << shift) & mask);
    } else {
        let n = (bits / 8) as usize;
        let end = byte.checked_add(n).ok_or(err.clone())?;
        let s = block.get_mut(byte..end).ok_or(err)?;
        let bytes = value.to_be_bytes();
        s.copy_from_slice(&bytes[8 - n..]);
    }
    Ok(())
}
