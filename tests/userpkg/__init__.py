"""A stand-in for a user's own package: models handed to toolkit as `userpkg.toy:FACTORY`."""
