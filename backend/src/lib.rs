//! snapblk daemon library (work in progress).
