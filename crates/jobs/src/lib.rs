//! Jobs: operations on images, each defined once for the CLI and the API.
