//! qcow2 engine (work in progress).
