"""Management: one layer for what mailrelay-admin, the JSON API and the panel do."""
