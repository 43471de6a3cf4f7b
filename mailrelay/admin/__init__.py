"""mailrelay-admin: the command line for users, accounts and the queue."""
