"""Build the PDF and DOCX documents of the sample handbook (examples/handbook/).

The text of every binary document lives in this file as Python data, so the
handbook folder itself contains only corpus files. Re-run after editing:

    python examples/build_handbook_binaries.py

Needs fpdf2 and python-docx (pypdf is used for an optional self-check).
PDFs use the core Helvetica font, so all text must be latin-1 encodable.
Creation dates are fixed so that rebuilding gives stable files.
"""

from __future__ import annotations

import datetime as dt
import io
import zipfile
from pathlib import Path

from docx import Document
from docx.shared import Pt
from fpdf import FPDF
from fpdf.enums import XPos, YPos

OUT = Path(__file__).resolve().parent / "handbook"
FIXED_DATE = dt.datetime(2025, 4, 1, 9, 0, 0, tzinfo=dt.UTC)

# A document is a title, a subtitle line and a list of blocks:
#   ("h1", text) ("h2", text) ("p", text) ("bullets", [text, ...])
#   ("table", [[header cells], [row cells], ...])

# ---------------------------------------------------------------------------
# PDF documents
# ---------------------------------------------------------------------------

SLA = {
    "file": "service-level-agreement.pdf",
    "title": "Quillfeather Enterprise Service Level Agreement",
    "subtitle": "Version 2.4, effective 1 January 2025",
    "running_header": "Brindlewood Labs - Quillfeather Enterprise SLA v2.4",
    "blocks": [
        ("h1", "1. Scope"),
        (
            "p",
            "This Service Level Agreement (SLA) forms part of the Enterprise subscription agreement between "
            "Brindlewood Labs and the Customer. It describes the availability that Brindlewood Labs commits to "
            "for the Quillfeather service, the support response times for Enterprise customers, and the service "
            "credits the Customer receives if a commitment is not met. The SLA applies only to workspaces on the "
            "Enterprise plan with a signed order form.",
        ),
        (
            "p",
            "The SLA covers the Quillfeather web application, the synchronisation service used by the desktop "
            "and mobile apps, and the public API. It does not cover beta features, third-party integrations, or "
            "the Customer's own network, devices or identity provider.",
        ),
        ("h1", "2. Definitions"),
        (
            "bullets",
            [
                "Monthly Availability: the percentage of minutes in a calendar month during which the service was "
                "available, excluding Scheduled Maintenance and the exclusions in section 4.",
                "Unavailable: more than 5 percent of requests to the service fail with a server error, or users "
                "cannot sign in or open pages, as measured by Brindlewood Labs' external monitoring.",
                "Monthly Fee: the subscription fee for the affected month, excluding taxes and one-off fees.",
                "Incident: an unplanned interruption or degradation of the service reported by the Customer or "
                "detected by Brindlewood Labs.",
            ],
        ),
        ("h1", "3. Availability commitment"),
        (
            "p",
            "Brindlewood Labs will make the Quillfeather service available at least 99.95 percent of the time "
            "in each calendar month. Availability is measured from several locations every minute, and the "
            "monthly results are published on the status page within ten days after the end of each month.",
        ),
        ("h2", "3.1 Scheduled maintenance"),
        (
            "p",
            "Maintenance that may interrupt the service is performed during a fixed weekly window. Scheduled "
            "maintenance takes place on Sundays between 02:00 and 04:00 UTC and is announced on the status page "
            "at least 5 days in advance. Most maintenance causes no interruption at all. Time spent in announced "
            "maintenance does not count as unavailable time.",
        ),
        (
            "p",
            "Emergency maintenance to fix a critical security vulnerability may be performed outside the window "
            "with shorter notice. Emergency maintenance counts as unavailable time if it interrupts the service.",
        ),
        ("h1", "4. Exclusions"),
        (
            "p",
            "The following do not count as unavailable time: interruptions caused by the Customer's systems or "
            "by actions of the Customer's users; failures of the Customer's identity provider; suspension of the "
            "service because of unpaid invoices or a breach of the terms of service; events beyond the reasonable "
            "control of Brindlewood Labs, such as acts of war or large-scale failures of the public internet; and "
            "problems with features labelled as beta.",
        ),
        ("h1", "5. Service credits"),
        (
            "p",
            "If the Monthly Availability falls below the commitment in section 3, the Customer is entitled to a "
            "service credit calculated as a percentage of the Monthly Fee, according to the following table.",
        ),
        (
            "table",
            [
                ["Monthly Availability", "Service credit"],
                ["Below 99.95% but at least 99.0%", "10% of the Monthly Fee"],
                ["Below 99.0% but at least 95.0%", "25% of the Monthly Fee"],
                ["Below 95.0%", "50% of the Monthly Fee"],
            ],
        ),
        (
            "p",
            "If monthly availability falls below 99.0 percent, the customer receives a service credit of 25 "
            "percent of the monthly fee, and below 95.0 percent the credit rises to 50 percent. The total "
            "service credits for any month never exceed 50 percent of the Monthly Fee.",
        ),
        ("h2", "5.1 Claiming a credit"),
        (
            "p",
            "Credits are not applied automatically. The customer must request a service credit within 30 days "
            "after the end of the month in which the unavailability occurred. The request must be sent by an "
            "owner of the workspace to the customer success manager and should include the dates and times of "
            "the unavailability.",
        ),
        (
            "p",
            "Approved credits are deducted from the next invoice. Credits have no cash value and are not paid "
            "out, except when the subscription ends without renewal, in which case unused credits are refunded. "
            "Service credits are the Customer's sole remedy for unavailability covered by this SLA.",
        ),
        ("h1", "6. Support for Enterprise customers"),
        (
            "p",
            "Enterprise customers may report incidents by phone, through the admin console or by email. The "
            "Customer assigns a severity when reporting; Brindlewood Labs may change the severity if it clearly "
            "does not match the definitions below.",
        ),
        (
            "table",
            [
                ["Severity", "Definition", "First response"],
                ["Severity 1", "Service unavailable for most users", "30 minutes, 24/7"],
                ["Severity 2", "Major feature unusable, no workaround", "2 hours, 24/7"],
                ["Severity 3", "Feature impaired, workaround exists", "1 business day"],
                ["Severity 4", "Question or minor issue", "3 business days"],
            ],
        ),
        (
            "p",
            "For Severity 1 incidents, the first response time is 30 minutes at any time of day, every day of "
            "the year. Severity 1 and Severity 2 incidents must be reported by phone to start the 24/7 response "
            "clock. During a Severity 1 incident, Brindlewood Labs works on the problem continuously until the "
            "service is restored or a workaround is in place.",
        ),
        ("h1", "7. Changes to this SLA"),
        (
            "p",
            "Brindlewood Labs may update this SLA, but no change will reduce the availability commitment or the "
            "service credits during the Customer's current subscription term. The version in force at the start "
            "of a term applies until that term ends.",
        ),
    ],
}

APPLIANCE = {
    "file": "vault-appliance-installation-guide.pdf",
    "title": "Quillfeather Vault QV-200 Installation Guide",
    "subtitle": "Document revision C, for appliance firmware 2.3.1",
    "running_header": "Quillfeather Vault QV-200 - Installation Guide - Rev. C",
    "blocks": [
        ("h1", "1. About the Vault appliance"),
        (
            "p",
            "The Quillfeather Vault QV-200 is an on-premises appliance for Enterprise customers who must keep "
            "copies of their attachments inside their own data centre, for example because of banking or "
            "health-care regulations. The Vault stores an encrypted cache of all attachments uploaded to the "
            "workspace and serves them to users on the local network, so that large files open quickly and "
            "remain available to internal users even if the internet connection fails.",
        ),
        (
            "p",
            "Page text and metadata continue to be stored in the Quillfeather cloud. The Vault is managed "
            "remotely by Brindlewood Labs for software updates, but the encryption keys for the local cache are "
            "generated on the appliance and never leave it.",
        ),
        ("h1", "2. Package contents"),
        (
            "bullets",
            [
                "One Vault QV-200 appliance (2U rack unit)",
                "Two power cords (C13 to regional plug)",
                "Sliding rail kit for 19-inch racks",
                "Front bezel with lock and two keys",
                "Printed quick-start card and the label sheet with the initial password",
            ],
        ),
        (
            "p",
            "Keep the label sheet in a safe place. It contains the serial number and the initial administrator "
            "password, which are needed during the first start.",
        ),
        ("h1", "3. Site requirements"),
        ("h2", "3.1 Rack and environment"),
        (
            "p",
            "The QV-200 occupies two rack units in a standard 19-inch rack with a depth of at least 650 mm. "
            "Allow 100 mm of free space behind the appliance for cables and airflow. The appliance is cooled "
            "front to back and must not be installed in a closed cabinet without ventilation. The supported "
            "operating temperature range is 10 to 35 degrees Celsius at up to 80 percent relative humidity.",
        ),
        ("h2", "3.2 Power"),
        (
            "p",
            "The appliance has two redundant, hot-swappable power supplies. Connect each power supply to a "
            "separate power circuit for full redundancy. The QV-200 draws about 420 W in typical operation and "
            "up to 650 W at peak, so plan for the peak value when sizing circuits and uninterruptible power "
            "supplies.",
        ),
        ("h2", "3.3 Network"),
        (
            "p",
            "The rear panel has one management port and two 25 GbE data ports. The management port has a fixed "
            "default address so that it can be reached before any configuration is done. The default "
            "management IP address of the QV-200 is 10.44.0.10 with a 255.255.255.0 subnet mask. Connect a "
            "laptop directly to the management port and give it an address in the same subnet, for example "
            "10.44.0.20, to reach the setup page.",
        ),
        (
            "p",
            "For normal operation, the data ports need outgoing HTTPS access on port 443 to "
            "vault-gw.quillfeather.app. No incoming connections from the internet are required.",
        ),
        ("h1", "4. Mounting the appliance"),
        (
            "p",
            "Attach the inner rails to the sides of the appliance and the outer rails to the rack posts, then "
            "slide the appliance into the rack until the rails click into place. Two people are needed to lift "
            "the appliance, which weighs 24 kg. Fit the front bezel after cabling is complete.",
        ),
        ("h1", "5. First start"),
        (
            "p",
            "Connect both power cords and press the power button on the front panel. The status light flashes "
            "blue while the appliance initialises its encrypted storage. The first boot takes about 12 minutes, "
            "and the status light turns solid blue when the appliance is ready. Later starts take less than two "
            "minutes.",
        ),
        (
            "p",
            "Open https://10.44.0.10 in a browser on the connected laptop. The browser will warn about a "
            "self-signed certificate; this is expected during setup. The default administrator username is "
            "vaultadmin, and the initial password is printed on the label sheet. You must choose a new password "
            "of at least 16 characters at the first sign-in.",
        ),
        ("h1", "6. Connecting the Vault to your workspace"),
        (
            "bullets",
            [
                "In the Quillfeather admin console, open Infrastructure > Vault and choose Add appliance.",
                "Copy the pairing code shown in the admin console.",
                "On the Vault setup page, enter the pairing code and the network settings for the data ports.",
                "Wait until both the admin console and the setup page show the appliance as Connected.",
            ],
        ),
        (
            "p",
            "The pairing code is valid for 30 minutes. If it expires, generate a new one in the admin console. "
            "After pairing, the Vault starts copying existing attachments from the cloud; depending on the "
            "amount of data, this initial copy can take several days, during which the service works normally.",
        ),
        ("h1", "7. Status lights"),
        (
            "table",
            [
                ["Light", "Meaning"],
                ["Flashing blue", "Starting up or initialising storage"],
                ["Solid blue", "Ready and connected"],
                ["Flashing amber", "Connected, but a disk or power supply needs attention"],
                ["Solid red", "Not connected to the Quillfeather cloud"],
            ],
        ),
        ("h1", "8. Warranty and replacement"),
        (
            "p",
            "The QV-200 comes with a three-year advance replacement warranty. If Brindlewood Labs confirms a "
            "hardware fault, a replacement part or appliance is shipped on the next business day, before the "
            "faulty unit is returned. Disks are never returned: faulty disks must be destroyed on site, and the "
            "Customer confirms the destruction in writing.",
        ),
    ],
}

DPA = {
    "file": "data-processing-addendum.pdf",
    "title": "Data Processing Addendum",
    "subtitle": "Version 3.1 - Quillfeather by Brindlewood Labs",
    "running_header": "Brindlewood Labs - Data Processing Addendum v3.1",
    "blocks": [
        ("h1", "1. Introduction"),
        (
            "p",
            "This Data Processing Addendum (DPA) forms part of the agreement between Brindlewood Labs Ltd. "
            "(Brindlewood Labs) and the customer that subscribes to Quillfeather (the Customer). It applies "
            "whenever Brindlewood Labs processes personal data on behalf of the Customer, and it is intended to "
            "meet the requirements of Article 28 of the General Data Protection Regulation (GDPR). This version "
            "3.1 of the DPA is effective from 1 September 2024 and replaces all earlier versions.",
        ),
        ("h1", "2. Roles and instructions"),
        (
            "p",
            "The Customer is the controller of Customer Personal Data, and Brindlewood Labs is the processor. "
            "Brindlewood Labs processes Customer Personal Data only on documented instructions from the "
            "Customer. The agreement, the Customer's configuration of the service and any written instructions "
            "from the Customer's workspace owners are the Customer's complete instructions.",
        ),
        ("h2", "2.1 Details of the processing"),
        (
            "bullets",
            [
                "Subject matter: provision of the Quillfeather note-taking and team wiki service.",
                "Duration: the term of the agreement, plus the period needed to delete data after it ends.",
                "Categories of data subjects: the Customer's members and guests, and people mentioned in content.",
                "Categories of data: names, email addresses, account and usage data, and any personal data the "
                "Customer chooses to store in pages, comments and attachments.",
            ],
        ),
        ("h1", "3. Confidentiality and security"),
        (
            "p",
            "Brindlewood Labs ensures that all personnel with access to Customer Personal Data are bound by "
            "confidentiality obligations. Brindlewood Labs maintains the technical and organisational measures "
            "described in Annex 2, including encryption of data in transit and at rest, role-based access "
            "control, logging of administrative access, and regular testing of backups and incident procedures.",
        ),
        ("h1", "4. Sub-processors"),
        (
            "p",
            "The Customer gives general authorisation for Brindlewood Labs to engage sub-processors. The current "
            "sub-processors are listed below.",
        ),
        (
            "table",
            [
                ["Sub-processor", "Purpose", "Location"],
                ["Halvard Cloud GmbH", "Hosting and storage", "Germany / United States"],
                ["Lettervane Ltd", "Transactional email", "Ireland"],
                ["Northgate Support Systems", "Support ticketing", "Netherlands"],
            ],
        ),
        (
            "p",
            "All Quillfeather workspaces, in both data regions, are hosted by the sub-processor Halvard Cloud "
            "GmbH. Brindlewood Labs will notify the Customer of any new sub-processor at least 28 days before it "
            "begins processing Customer Personal Data. The Customer may object to a new sub-processor on "
            "reasonable data protection grounds during that period; if the parties cannot resolve the "
            "objection, the Customer may terminate the affected part of the service and receive a pro-rata "
            "refund.",
        ),
        (
            "p",
            "Brindlewood Labs imposes data protection obligations on each sub-processor that are no less "
            "protective than those in this DPA and remains responsible for their performance.",
        ),
        ("h1", "5. Personal data breaches"),
        (
            "p",
            "Brindlewood Labs will notify the Customer without undue delay, and in any case within 36 hours, "
            "after becoming aware of a personal data breach affecting Customer Personal Data. The notification "
            "is sent to the workspace owners and the security contact named in the admin console, and includes "
            "the nature of the breach, the likely consequences, and the measures taken or proposed.",
        ),
        (
            "p",
            "Brindlewood Labs will provide further information as it becomes available and will cooperate with "
            "the Customer in meeting its own notification obligations towards supervisory authorities and data "
            "subjects. A notification is not an acknowledgement of fault or liability.",
        ),
        ("h1", "6. Assistance"),
        (
            "p",
            "Taking into account the nature of the processing, Brindlewood Labs assists the Customer in "
            "responding to requests from data subjects, mainly through the self-service features of the admin "
            "console, and in carrying out data protection impact assessments where the Customer reasonably "
            "requests it.",
        ),
        ("h1", "7. Audits"),
        (
            "p",
            "Brindlewood Labs makes available its current independent security certifications and audit reports "
            "on request. Where these are not sufficient to demonstrate compliance, the Customer may conduct an "
            "audit once per calendar year, with at least 6 weeks' written notice. Audits take place during "
            "normal business hours, must not disrupt the service for other customers, and are carried out at "
            "the Customer's expense by the Customer or an independent auditor bound by confidentiality.",
        ),
        ("h1", "8. International transfers"),
        (
            "p",
            "Where Customer Personal Data is transferred to a country outside the European Economic Area that "
            "does not benefit from an adequacy decision, the transfer is governed by the Standard Contractual "
            "Clauses adopted by the European Commission, which are incorporated into this DPA by reference.",
        ),
        ("h1", "9. Return and deletion"),
        (
            "p",
            "At the end of the agreement, the Customer may export its data using the export features of the "
            "service. Brindlewood Labs then deletes Customer Personal Data in accordance with the retention "
            "periods described in the product documentation, unless applicable law requires it to be kept.",
        ),
        ("h1", "10. Governing law"),
        (
            "p",
            "This DPA is governed by the laws of Ireland, and the courts of Dublin have exclusive jurisdiction "
            "over any dispute arising from it, unless the Standard Contractual Clauses require otherwise.",
        ),
    ],
}

PARTNER = {
    "file": "partner-programme-terms.pdf",
    "title": "Quillfeather Partner Programme Terms",
    "subtitle": "2025 edition",
    "running_header": "Quillfeather Partner Programme Terms - 2025 edition",
    "blocks": [
        ("h1", "1. Purpose of the programme"),
        (
            "p",
            "The Quillfeather Partner Programme helps consultancies, system integrators and resellers build a "
            "business around Quillfeather. Partners refer new customers, resell subscriptions, and help "
            "customers plan, migrate and roll out their team wikis. These terms describe the partner tiers, the "
            "benefits of each tier, and the obligations of partners and of Brindlewood Labs.",
        ),
        ("h1", "2. Partner tiers"),
        (
            "p",
            "Every partner starts at the Registered tier. Partners move to a higher tier once they meet its "
            "requirements, and tiers are reviewed every twelve months.",
        ),
        (
            "table",
            [
                ["Tier", "Certified consultants", "Seats under management"],
                ["Registered", "None required", "None required"],
                ["Silver", "At least 2", "At least 250"],
                ["Gold", "At least 6", "At least 1,500"],
            ],
        ),
        (
            "p",
            "To reach the Gold tier, a partner needs at least 6 certified consultants and at least 1,500 seats "
            "under management. Seats under management are paid seats in customer workspaces for which the "
            "partner is recorded as the partner of record.",
        ),
        ("h2", "2.1 Benefits"),
        (
            "bullets",
            [
                "Registered: access to the partner portal, sales materials and a not-for-resale demo workspace.",
                "Silver: everything in Registered, plus the right to resell subscriptions and a listing in the "
                "partner directory.",
                "Gold: everything in Silver, plus a named partner manager, joint marketing funds and early access to "
                "upcoming releases.",
            ],
        ),
        ("h1", "3. Referrals"),
        (
            "p",
            "Partners at any tier may refer prospective customers to Brindlewood Labs through the partner "
            "portal. Referral partners receive a referral fee of 15 percent of the first-year net revenue from "
            "each referred customer. The fee is paid quarterly in arrears, once the customer has paid its "
            "invoices, and is not paid for customers who were already in contact with Brindlewood Labs during "
            "the previous six months.",
        ),
        ("h1", "4. Deal registration"),
        (
            "p",
            "Partners who resell must register each opportunity in the partner portal before submitting a "
            "quote. Brindlewood Labs approves or rejects a registration within three business days. An approved "
            "deal registration protects the partner's opportunity for 120 days, during which no other partner "
            "will be given the same terms for the same customer. The protection can be extended once by a "
            "further 60 days if the partner shows that the opportunity is still active.",
        ),
        ("h1", "5. Certification"),
        (
            "p",
            "Consultants become certified by passing the Quillfeather Certified Consultant exam, an online exam "
            "of 60 questions covering workspace design, administration, security and migration. The pass mark "
            "for the Quillfeather Certified Consultant exam is 78 percent. Each certification is valid for two "
            "years; consultants renew it by passing a shorter update exam.",
        ),
        (
            "p",
            "Registered partners receive two free exam attempts per year. Silver and Gold partners receive "
            "unlimited attempts for their own staff.",
        ),
        ("h1", "6. Partner obligations"),
        (
            "bullets",
            [
                "Represent Quillfeather accurately and use only approved logos and product names.",
                "Keep customer information confidential and comply with applicable data protection law.",
                "Give first-line support to customers for whom the partner is the partner of record.",
                "Do not make commitments on behalf of Brindlewood Labs, including about future features.",
            ],
        ),
        ("h1", "7. Term and termination"),
        (
            "p",
            "Partnership agreements run for one year and renew automatically. Either party may end the "
            "partnership without giving a reason with 60 days' written notice, or immediately in case of a "
            "material breach that is not remedied within 30 days. Customers of a departing partner keep their "
            "subscriptions, and Brindlewood Labs or another partner takes over their support.",
        ),
        ("h1", "8. Contact"),
        (
            "p",
            "Questions about the programme can be sent to the partner team at partners@quillfeather.app or "
            "asked through the partner portal.",
        ),
    ],
}

# ---------------------------------------------------------------------------
# DOCX documents
# ---------------------------------------------------------------------------

ONBOARDING = {
    "file": "admin-onboarding-checklist.docx",
    "title": "Onboarding checklist for new workspace administrators",
    "subtitle": "Quillfeather Customer Success - for Pro and Enterprise workspaces",
    "blocks": [
        (
            "p",
            "Congratulations on your new Quillfeather workspace. This checklist collects what our customer "
            "success team has learned from hundreds of rollouts. It is written for the person who will "
            "administer the workspace, and it takes you from the signed order to a workspace that your "
            "colleagues use every day. Tick off each item as you go.",
        ),
        ("h1", "Before the kickoff"),
        (
            "p",
            "Most rollouts start with a short kickoff call between your project team and Brindlewood Labs. The "
            "kickoff call lasts 45 minutes and is scheduled within 5 business days of the order being signed. "
            "Invite the person who will own the workspace, someone from IT who can change DNS records, and one "
            "or two enthusiastic future users.",
        ),
        (
            "p",
            "Customers with 100 or more seats are assigned a named onboarding specialist for the first 60 days "
            "after signing. The onboarding specialist joins the kickoff call and is your contact for all "
            "questions during the rollout.",
        ),
        (
            "bullets",
            [
                "Decide who will be the primary owner of the workspace.",
                "List the teams that will use Quillfeather first, and one champion per team.",
                "Collect existing documentation that should be moved into Quillfeather.",
            ],
        ),
        ("h1", "Week 1: Set up the foundations"),
        ("h2", "Identity and security"),
        (
            "p",
            "Verify your email domain in the admin console first, because single sign-on and several security "
            "settings depend on it. Then decide how people will sign in. We recommend requiring two-factor "
            "authentication for all members before the end of day 14, while the number of members is still "
            "small and help is easy to give.",
        ),
        ("h2", "Structure"),
        (
            "p",
            "Create the first shelves before inviting anyone. A good starting point is one shelf per team and "
            "one shared shelf for company-wide information such as policies and the holiday calendar. Avoid "
            "creating more than ten shelves at the start; it is easier to split a shelf later than to merge "
            "many empty ones.",
        ),
        ("h1", "Weeks 2 to 4: Bring people in"),
        (
            "p",
            "Invite the champions first and give them a week to fill their shelves with useful pages before the "
            "rest of the company joins. People are far more likely to keep using a wiki that already contains "
            "answers to their questions on day one.",
        ),
        (
            "p",
            "Administrators should take the training course before the wider rollout. The self-paced course "
            "Quillfeather Admin Essentials takes about 3 hours to complete and covers roles, shelves, security "
            "settings, integrations and the audit log. It is free for all Pro and Enterprise customers.",
        ),
        ("h1", "Checklist"),
        (
            "table",
            [
                ["Task", "Owner", "When"],
                ["Hold the kickoff call", "Project lead", "Week 1"],
                ["Verify the email domain", "IT", "Week 1"],
                ["Configure single sign-on (Enterprise)", "IT", "Week 1"],
                ["Require two-factor authentication", "Workspace admin", "By day 14"],
                ["Create the first shelves", "Workspace admin", "Week 1"],
                ["Install the Slack or Teams integration", "Workspace admin", "Week 2"],
                ["Invite team champions", "Workspace admin", "Week 2"],
                ["Complete Admin Essentials", "All admins", "Week 2"],
                ["Invite everyone else", "Workspace admin", "Week 3 or 4"],
                ["Review usage reports", "Project lead", "End of week 4"],
            ],
        ),
        ("h1", "After the rollout"),
        (
            "p",
            "Schedule a review at the end of the first month. Look at the usage reports in the admin console to "
            "find shelves that nobody visits and teams that have not started yet, and talk to their champions. "
            "Many customers also appoint shelf managers at this point, so that day-to-day access requests no "
            "longer go through the administrators.",
        ),
    ],
}

RUNBOOK = {
    "file": "incident-response-runbook.docx",
    "title": "Incident response runbook",
    "subtitle": "Brindlewood Labs Site Reliability Engineering - internal, version 7",
    "blocks": [
        (
            "p",
            "This runbook describes how Brindlewood Labs responds to incidents that affect the Quillfeather "
            "service. It is published in the customer handbook so that Enterprise customers can see how we work "
            "when something goes wrong. Internal tools and contact details have been left in on purpose.",
        ),
        ("h1", "Severity levels"),
        (
            "table",
            [
                ["Level", "Description", "Examples"],
                [
                    "SEV-1",
                    "Service down or data at risk for many customers",
                    "Nobody can sign in; data loss",
                ],
                [
                    "SEV-2",
                    "Major feature broken for many customers",
                    "Sync delayed by more than 10 minutes",
                ],
                [
                    "SEV-3",
                    "Feature degraded or broken for a few customers",
                    "Exports failing in one region",
                ],
                ["SEV-4", "Minor issue with little customer impact", "Wrong text in an email"],
            ],
        ),
        (
            "p",
            "When in doubt, choose the higher severity. An incident can always be downgraded later, but a slow "
            "start cannot be undone.",
        ),
        ("h1", "Detection and paging"),
        (
            "p",
            "Incidents are detected by automated monitoring or reported by customers and colleagues. The "
            "on-call engineer is paged through Nightjar, our paging tool, and must acknowledge a page within 10 "
            "minutes. If the page is not acknowledged in time, Nightjar escalates to the secondary on-call "
            "engineer and then to the engineering manager on duty.",
        ),
        ("h1", "Roles during an incident"),
        ("h2", "Incident commander"),
        (
            "p",
            "Every SEV-1 and SEV-2 incident has an incident commander, who coordinates the response but does not "
            "fix the problem personally. The first responder is the incident commander until they hand the role "
            "over explicitly. The incident commander decides on the severity, brings in the right people and "
            "makes sure that communication happens on time.",
        ),
        ("h2", "Communications lead"),
        (
            "p",
            "The communications lead writes all customer-facing updates, informs the support team and contacts "
            "the customer success managers of affected Enterprise customers.",
        ),
        ("h2", "Subject matter experts"),
        (
            "p",
            "Engineers from the affected teams investigate and fix the problem. They report their findings to "
            "the incident commander and avoid making risky changes without telling the incident channel.",
        ),
        ("h1", "Communication"),
        (
            "p",
            "All incident communication happens in the Slack channel #inc-bridge, so that everyone can follow "
            "the same timeline. Side conversations in direct messages are discouraged because they are lost "
            "from the record.",
        ),
        (
            "p",
            "Customers are informed through the public status page. During a SEV-1 incident, the status page "
            "must be updated at least every 20 minutes, even if there is nothing new to report. For SEV-2 "
            "incidents, updates are posted at least every hour.",
        ),
        ("h1", "Resolution"),
        (
            "bullets",
            [
                "Restore the service first; finding the root cause can wait until customers are no longer affected.",
                "Prefer rolling back a recent change over writing a new fix under pressure.",
                "Before declaring the incident resolved, watch the monitoring for at least 30 minutes.",
                "Post a final update on the status page when the incident is resolved.",
            ],
        ),
        ("h1", "After the incident"),
        (
            "p",
            "A post-incident review must be published within 5 business days after a SEV-1 or SEV-2 incident. "
            "Reviews are blameless: they describe what happened, why it made sense to the people involved at the "
            "time, and which changes will make a repeat less likely. Enterprise customers affected by a SEV-1 "
            "incident receive a summary of the review from their customer success manager.",
        ),
        (
            "p",
            "Action items from the review are tracked like any other engineering work, with an owner and a due "
            "date, and the incident commander checks their progress after one month.",
        ),
    ],
}

RESELLER_MEMO = {
    "file": "reseller-price-list-memo.docx",
    "title": "Memo: Reseller price list from 1 April 2025",
    "subtitle": "Brindlewood Labs Channel Sales",
    "blocks": [
        (
            "table",
            [
                ["From", "Ines Calloway, Head of Channel Sales"],
                ["To", "All authorised Quillfeather resellers"],
                ["Date", "14 March 2025"],
                ["Subject", "New reseller prices and ordering rules"],
            ],
        ),
        (
            "p",
            "Dear partners, this memo was written by Ines Calloway, Head of Channel Sales at Brindlewood Labs, "
            "to explain the changes to reseller pricing that take effect this spring. The new reseller price "
            "list takes effect on 1 April 2025 and applies to all new orders and renewals from that date.",
        ),
        ("h1", "Reseller discounts"),
        (
            "p",
            "Reseller discounts are calculated from the public list price of each plan and depend on your tier "
            "in the partner programme. Silver resellers receive a discount of 20 percent off the list price, and "
            "Gold resellers receive a discount of 28 percent. Registered partners cannot resell and should use "
            "the referral process instead.",
        ),
        ("h2", "Net prices per seat and month"),
        (
            "p",
            "The table below shows the resulting net prices in euros per seat per month for monthly terms. "
            "Enterprise prices are quoted per deal.",
        ),
        (
            "table",
            [
                ["Plan", "Silver reseller net price", "Gold reseller net price"],
                ["Plus", "4.80 EUR", "4.32 EUR"],
                ["Pro", "11.60 EUR", "10.44 EUR"],
                ["Enterprise", "Quoted per deal", "Quoted per deal"],
            ],
        ),
        ("h1", "Ordering rules"),
        (
            "p",
            "The minimum order through a reseller is 10 seats, both for new workspaces and for additional seats "
            "in existing workspaces. Smaller orders should be placed by the customer directly on the website.",
        ),
        (
            "p",
            "Reseller quotes are valid for 45 days from the date of issue. Quotes issued before 1 April 2025 at "
            "the old prices remain valid until they expire, so there is no need to reissue them.",
        ),
        ("h1", "Renewals"),
        (
            "p",
            "Renewals of annual subscriptions that fall due in April 2025 may still be invoiced at the old "
            "reseller prices if the order is received by 31 March 2025. After that date, the new prices apply to "
            "all renewals.",
        ),
        ("h1", "Questions"),
        (
            "p",
            "Please contact your partner manager or the channel sales team if you have questions about this "
            "memo. Thank you for your continued partnership.",
        ),
    ],
}

ACCESSIBILITY = {
    "file": "accessibility-statement.docx",
    "title": "Quillfeather accessibility statement",
    "subtitle": "Brindlewood Labs",
    "blocks": [
        (
            "p",
            "Brindlewood Labs wants everyone to be able to write, read and share knowledge with Quillfeather, "
            "including people who use assistive technology. This statement describes how accessible the "
            "Quillfeather web, desktop and mobile apps are today, what we know is not yet good enough, and how "
            "to contact us about accessibility.",
        ),
        ("h1", "Our commitment"),
        (
            "p",
            "Quillfeather aims to conform to the Web Content Accessibility Guidelines (WCAG) 2.2 at level AA. "
            "Accessibility is part of our design reviews, and every new feature is tested with a keyboard and at "
            "least one screen reader before it is released.",
        ),
        ("h1", "How we test"),
        (
            "p",
            "Our own teams test with NVDA and JAWS on Windows, VoiceOver on macOS and iOS, and TalkBack on "
            "Android. In addition, we commission regular independent audits. The most recent independent audit "
            "was carried out by Fairlight Access Partners in January 2025, and it covered the web app, the "
            "Windows desktop app and the iOS app.",
        ),
        ("h1", "Conformance status"),
        (
            "p",
            "Quillfeather is partially conformant with WCAG 2.2 level AA. Partially conformant means that some "
            "parts of the product do not yet fully conform to the standard. The known issues are listed below.",
        ),
        ("h2", "Known issues"),
        (
            "bullets",
            [
                "Canvas pages: items placed freely on a canvas are not announced in a logical reading order by "
                "screen readers. As a workaround, every canvas can be viewed as an outline from the View menu.",
                "Drag and drop: moving blocks requires a mouse in some dialogs. Keyboard alternatives exist in the "
                "editor itself but not yet in the shelf settings.",
                "Colour contrast: some labels in the sepia theme do not meet the required contrast ratio.",
                "Charts in usage reports have no text alternative; the data can be downloaded as CSV instead.",
            ],
        ),
        (
            "p",
            "We plan to fix the issues with drag and drop and colour contrast in the first half of 2025 and the "
            "issues with Canvas pages before the end of 2025.",
        ),
        ("h1", "Features that help"),
        (
            "bullets",
            [
                "Every function in the editor can be reached with the keyboard.",
                "The interface follows the operating system's text size, reduced motion and high-contrast settings.",
                "Images can be given alternative text, and authors are reminded when it is missing.",
                "Voice notes are transcribed automatically, which also helps people who cannot listen to audio.",
            ],
        ),
        ("h1", "Feedback and contact"),
        (
            "p",
            "We welcome feedback on the accessibility of Quillfeather. Please tell us if you meet a barrier, "
            "including in our documentation. Write to access@quillfeather.app; we reply to accessibility "
            "feedback within 3 working days. If you need information from our documentation in a different "
            "format, such as large print or plain text, we will provide it.",
        ),
        ("h1", "About this statement"),
        (
            "p",
            "This statement was prepared on 20 February 2025, based on the independent audit and our own "
            "testing, and it is reviewed every six months.",
        ),
    ],
}

PDF_DOCS = [SLA, APPLIANCE, DPA, PARTNER]
DOCX_DOCS = [ONBOARDING, RUNBOOK, RESELLER_MEMO, ACCESSIBILITY]


# ---------------------------------------------------------------------------
# Renderers
# ---------------------------------------------------------------------------


class _HandbookPDF(FPDF):
    def __init__(self, running_header: str):
        super().__init__(format="A4")
        self.running_header = running_header

    def header(self):
        if self.page_no() == 1:
            return
        self.set_font("Helvetica", "I", 8)
        self.set_text_color(110, 110, 110)
        self.cell(0, 6, self.running_header, align="R")
        self.ln(10)
        self.set_text_color(0, 0, 0)

    def footer(self):
        self.set_y(-14)
        self.set_font("Helvetica", "", 8)
        self.set_text_color(110, 110, 110)
        self.cell(0, 6, f"Page {self.page_no()} of {{nb}}", align="C")
        self.set_text_color(0, 0, 0)


def _check_latin1(doc: dict) -> None:
    texts = [doc["title"], doc["subtitle"], doc["running_header"]]
    for kind, value in doc["blocks"]:
        if kind in ("bullets",):
            texts.extend(value)
        elif kind == "table":
            texts.extend(cell for row in value for cell in row)
        else:
            texts.append(value)
    for text in texts:
        text.encode("latin-1")  # raises if a character cannot use the core fonts


def build_pdf(doc: dict) -> Path:
    _check_latin1(doc)
    pdf = _HandbookPDF(doc["running_header"])
    pdf.set_title(doc["title"])
    pdf.set_author("Brindlewood Labs")
    pdf.set_creator("examples/build_handbook_binaries.py")
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_margins(22, 20, 22)
    pdf.set_auto_page_break(True, margin=22)
    pdf.add_page()

    pdf.set_font("Helvetica", "B", 18)
    pdf.multi_cell(0, 9, doc["title"], new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("Helvetica", "", 10.5)
    pdf.set_text_color(90, 90, 90)
    pdf.multi_cell(0, 6, doc["subtitle"], new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_text_color(0, 0, 0)
    pdf.ln(4)

    for kind, value in doc["blocks"]:
        if kind == "h1":
            pdf.ln(3)
            pdf.set_font("Helvetica", "B", 13)
            pdf.multi_cell(0, 7, value, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(1)
        elif kind == "h2":
            pdf.ln(1)
            pdf.set_font("Helvetica", "B", 11)
            pdf.multi_cell(0, 6, value, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        elif kind == "p":
            pdf.set_font("Helvetica", "", 10.5)
            pdf.multi_cell(0, 5.6, value, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(2)
        elif kind == "bullets":
            pdf.set_font("Helvetica", "", 10.5)
            for item in value:
                pdf.set_x(pdf.l_margin + 4)
                pdf.multi_cell(0, 5.6, "- " + item, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
                pdf.ln(1)
            pdf.ln(1)
        elif kind == "table":
            pdf.set_font("Helvetica", "", 9)
            with pdf.table(first_row_as_headings=True, line_height=5.5) as table:
                for row in value:
                    r = table.row()
                    for cell in row:
                        r.cell(cell)
            pdf.ln(3)
        else:
            raise ValueError(kind)

    path = OUT / doc["file"]
    pdf.output(str(path))
    return path


def build_docx(doc: dict) -> Path:
    document = Document()
    document.core_properties.title = doc["title"]
    document.core_properties.author = "Brindlewood Labs"
    document.core_properties.created = FIXED_DATE.replace(tzinfo=None)
    document.core_properties.modified = FIXED_DATE.replace(tzinfo=None)
    document.core_properties.revision = 1

    document.add_heading(doc["title"], level=0)
    sub = document.add_paragraph(doc["subtitle"])
    sub.runs[0].italic = True

    for kind, value in doc["blocks"]:
        if kind == "h1":
            document.add_heading(value, level=1)
        elif kind == "h2":
            document.add_heading(value, level=2)
        elif kind == "p":
            document.add_paragraph(value)
        elif kind == "bullets":
            for item in value:
                document.add_paragraph(item, style="List Bullet")
        elif kind == "table":
            table = document.add_table(rows=0, cols=len(value[0]))
            table.style = "Table Grid"
            for i, row in enumerate(value):
                cells = table.add_row().cells
                for cell, text in zip(cells, row, strict=True):
                    cell.text = text
                    if i == 0 and doc is not RESELLER_MEMO:
                        for run in cell.paragraphs[0].runs:
                            run.bold = True
            document.add_paragraph()
        else:
            raise ValueError(kind)

    for paragraph in document.paragraphs:
        for run in paragraph.runs:
            if run.font.size is None and paragraph.style.name == "Normal":
                run.font.size = Pt(11)

    path = OUT / doc["file"]
    buffer = io.BytesIO()
    document.save(buffer)
    path.write_bytes(_stable_zip(buffer.getvalue()))
    return path


def _stable_zip(data: bytes) -> bytes:
    """Rewrite a .docx (a ZIP file) with fixed entry timestamps so rebuilds are byte-identical."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as src,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=FIXED_DATE.timetuple()[:6])
            fixed.compress_type = zipfile.ZIP_DEFLATED
            fixed.external_attr = 0o644 << 16
            dst.writestr(fixed, src.read(info.filename))
    return out.getvalue()


def _self_check(paths: list[Path]) -> None:
    try:
        from pypdf import PdfReader
    except ImportError:  # pragma: no cover - optional
        return
    for path in paths:
        if path.suffix == ".pdf":
            reader = PdfReader(str(path))
            words = sum(len((p.extract_text() or "").split()) for p in reader.pages)
            print(f"  {path.name}: {len(reader.pages)} pages, {words} words extracted")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    built = [build_pdf(d) for d in PDF_DOCS] + [build_docx(d) for d in DOCX_DOCS]
    for path in built:
        print(f"wrote {path.relative_to(OUT.parent.parent)}")
    _self_check(built)


if __name__ == "__main__":
    main()
