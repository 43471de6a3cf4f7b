"""mailrelay: an authenticated SMTP submission relay on Twisted."""
